"""Run a repo script in two CPU processes (DDP or FSDP2 over gloo), as the two-process tests need."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(backend: str, script: str, *argv, world: int = 2, timeout: float = 300, env: dict | None = None) -> list[str]:
    """Start `world` ranks of tests/dist_worker.py; return each rank's output. A rank that fails,
    or a run that takes longer than `timeout` seconds (a hang), fails the calling test."""
    port = _free_port()
    procs = []
    for rank in range(world):
        e = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
             "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false"}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "dist_worker.py"), backend, script,
                                       *map(str, argv)], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"{script} {backend} x{world} did not finish in {timeout} s (a hang?)") from None
    for rank, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise AssertionError(f"rank {rank} of {script} ({backend}) exited {p.returncode}:\n{out[-4000:]}")
    return outs
