"""A tensor-parallel rank > 0 of ``LLMEngine.from_config``, as a process of its own.

``from_config`` starts each further rank as ``python -m engine.rank.follower`` with the model
config on stdin. Unlike ``multiprocessing``'s spawn method, this never imports the caller's
main module, so a plain script (no ``if __name__ == "__main__":`` guard) can use the engine.
The process exits when rank 0 says stop, when the process group breaks, or when the process
that started it is gone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARENT_POLL_S = 1.0


def start(config_json: str, rank: int, world_size: int, port: int, checkpoint: str) -> subprocess.Popen:
    """Start rank ``rank`` as a child process; its output goes where this process's goes."""
    env = dict(os.environ)
    # A source checkout: the child imports this project the way this process did.
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])
    command = [
        sys.executable, "-m", "engine.rank.follower",
        "--rank", str(rank), "--world-size", str(world_size), "--port", str(port),
        "--checkpoint", checkpoint, "--parent", str(os.getpid()),
    ]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, env=env, text=True)
    process.stdin.write(config_json)
    process.stdin.close()
    return process


def _exit_with_parent(parent: int) -> None:
    """Leave when the starting process is gone (it may have been killed without telling us)."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    threading.Thread(target=_exit_with_parent, args=(args.parent,), daemon=True).start()

    from cluster.config import ModelConfig
    from engine.rank.worker import TPWorker

    config = ModelConfig.model_validate_json(sys.stdin.read())
    worker = TPWorker(
        config, args.rank, args.world_size, "127.0.0.1", args.port, checkpoint_dir=args.checkpoint
    )
    worker.load()
    worker.serve_forever()
    worker.shutdown()


if __name__ == "__main__":
    main()
