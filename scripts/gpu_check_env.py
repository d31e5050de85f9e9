"""Helpers of scripts/gpu_check.sh: what is missing, its requirements, versions, the summary.

    python scripts/gpu_check_env.py missing                   # import names not importable
    python scripts/gpu_check_env.py requirements NAME...      # their pip requirements, pinned
    python scripts/gpu_check_env.py versions                  # JSON of installed versions
    python scripts/gpu_check_env.py summary OUT_DIR RC SECONDS MISSING   # writes gpu_check.json
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# import name -> pip requirement (the versions the project pins; docker/constraints.txt)
NEEDED = {
    "torch": "torch==2.13.0",
    "transformers": "transformers==5.24.0",
    "deepspeed": "deepspeed==0.19.8",
    "ray": "ray[serve]==2.60.0",
    "pydantic": "pydantic>=2.14,<3",
    "yaml": "pyyaml>=6",
    "safetensors": "safetensors>=0.5",
    "sentencepiece": "sentencepiece>=0.2",
    "bitsandbytes": "bitsandbytes>=0.50,<0.51",
    "accelerate": "accelerate>=1.10",
    "pytest": "pytest>=8",
    "pytest_timeout": "pytest-timeout>=2.3",
    "pyarrow": "pyarrow>=26,<27",
}
DISTRIBUTIONS = {"yaml": "pyyaml", "pytest_timeout": "pytest-timeout"}


def missing() -> list[str]:
    out = []
    for name in NEEDED:
        try:  # some packages log to stdout on import (DeepSpeed): keep stdout for the answer
            with contextlib.redirect_stdout(io.StringIO()):
                importlib.import_module(name)
        except Exception:  # ImportError, or a package that fails on import
            out.append(name)
    return out


def versions() -> dict:
    found = {}
    for name in NEEDED:
        try:
            found[name] = importlib.metadata.version(DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    try:
        import torch

        found["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        found["cuda_runtime"] = torch.version.cuda
    except Exception as exc:
        found["cuda_device"] = f"error: {exc}"
    return found


def test_outcomes(xml_path: Path) -> dict:
    if not xml_path.is_file():
        return {"error": "no JUnit report (pytest did not finish)"}
    outcomes = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            skipped = case.find("skipped")
            outcomes[name] = f"skipped: {skipped.get('message', '')}"[:200]
        else:
            outcomes[name] = "passed"
    return outcomes


def summary(out_dir: str, rc: str, seconds: str, still_missing: str) -> None:
    out = Path(out_dir)
    tests = test_outcomes(out / "gpu_tests.xml")
    decode_file = out / "gpu_decode.json"
    decode = json.loads(decode_file.read_text()) if decode_file.is_file() else None
    counts = {k: sum(1 for v in tests.values() if str(v).startswith(k)) for k in ("passed", "failed", "skipped")}
    result = {
        # all skipped is not a pass: the check proves nothing then
        "passed": rc == "0" and counts["passed"] > 0 and counts["failed"] == 0,
        "pytest_exit_status": int(rc), "seconds": int(seconds),
        "counts": counts, "missing_packages": still_missing.split(), "versions": versions(),
        "tests": tests,
        "decode_tokens_per_s": decode.get("decode_tokens_per_s") if decode else None,
        "note": "one GPU: tensor parallelism over NCCL (tp>1) is not exercised here; "
        "tp>1 correctness is covered by the CPU tests",
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    command, rest = argv[0], argv[1:]
    if command == "missing":
        print(" ".join(missing()))
    elif command == "requirements":
        print(" ".join(NEEDED[name] for name in rest if name in NEEDED))
    elif command == "versions":
        print(json.dumps(versions(), indent=2))
    elif command == "summary":
        summary(*rest[:3], rest[3] if len(rest) > 3 else "")
    else:
        raise SystemExit(f"unknown command {command!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
