"""The OpenAPI spec of the HTTP API, generated from the FastAPI app the ingress serves.

    python -m deployments.openapi_spec              # writes docs/openapi.json
    python -m deployments.openapi_spec --check      # exit 1 if docs/openapi.json is stale

The app is built without an ingress behind it (``create_http_app(None)``): routes, request and
response models and error bodies are all the spec needs. docs/api.md explains the API; this
file is what clients generate code from. tests/unit/deployments/http/test_openapi_spec.py fails when the
committed spec no longer matches the code.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def build_openapi() -> dict[str, Any]:
    """The spec of the routes ``deployments.http.app`` serves."""
    from deployments.http.app import create_http_app

    return create_http_app(None).openapi()


def render(spec: dict[str, Any]) -> str:
    """Stable text: two-space indent, key order as FastAPI emits it, a final newline."""
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def stale_diff(path: Path = DEFAULT_PATH, limit: int = 40) -> str | None:
    """None when ``path`` holds the current spec, else the first lines of a unified diff."""
    current = render(build_openapi())
    committed = path.read_text() if path.exists() else ""
    if committed == current:
        return None
    diff = difflib.unified_diff(
        committed.splitlines(), current.splitlines(), str(path), "generated", lineterm=""
    )
    return "\n".join(list(diff)[:limit]) or f"{path} is missing"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write or check the OpenAPI spec of the HTTP API.")
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH, help="default: docs/openapi.json")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = ap.parse_args(argv)
    if args.check:
        diff = stale_diff(args.out)
        if diff is None:
            print(f"{args.out} is up to date")
            return 0
        print(f"{args.out} is out of date; run `python -m deployments.openapi_spec`:\n{diff}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(build_openapi()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
