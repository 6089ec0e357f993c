"""GPU leases: which GPU of the host a process computes on, when several share the host's GPUs
(`dvc queue start -j 8` on an 8-GPU node). Apart from torch, so a process can wait for a GPU
before it pays for importing it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
import time
from pathlib import Path


def lease_directory() -> Path:
    return Path(
        os.environ.get("LIPDD_GPU_LEASES") or Path(tempfile.gettempdir()) / "lipdd-gpu-leases"
    )


_LEASES: list[int] = []  # file descriptors of the slots this process holds, open until it exits


def lease_gpu(
    gpus: list[str], runs_per_gpu: int, directory: Path | None = None, poll: float = 1.0
) -> int:
    """Index in `gpus` of a GPU this process now holds one of `runs_per_gpu` slots of, for the rest
    of its life; waits while every slot is taken. A slot is an flock on a file named after the GPU
    in a directory every process of the host shares (lease_directory): the kernel releases it when
    its holder exits, however it exits (SIGKILL included), so no lease outlives its process and no
    stale file needs cleaning. First slots fill before second ones: runs spread over the GPUs."""
    directory = directory or lease_directory()
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # shared by every user of the host, as /tmp is
            directory.chmod(0o1777)
    waiting = False
    while True:
        for slot in range(runs_per_gpu):
            for index, gpu in enumerate(gpus):
                path = directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}-slot-{slot}.lock"
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                _LEASES.append(fd)
                if waiting:
                    print(f"leased GPU {gpu}", file=sys.stderr)
                return index
        if not waiting:
            print(
                f"waiting for a GPU: all {len(gpus)} visible hold runs_per_gpu={runs_per_gpu} "
                f"processes (leases in {directory})",
                file=sys.stderr,
            )
            waiting = True
        time.sleep(poll)
