"""GPU leases on simulated devices: concurrent processes never share a GPU beyond runs_per_gpu, the
ones that find every slot taken wait, and a SIGKILLed holder's GPU is taken by the next."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def holder(
    directory: Path, gpus: list[str], runs_per_gpu: int, hold: float, log: Path
) -> subprocess.Popen:
    """A process that leases a GPU, notes when it holds it, holds it for `hold` seconds and
    exits."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(SRC)!r}); from lipdd.leases import lease_gpu\n"
        f"i = lease_gpu({gpus!r}, {runs_per_gpu}, __import__('pathlib').Path({str(directory)!r}),"
        " poll=0.02)\n"
        f"start = time.monotonic(); print(i, flush=True); time.sleep({hold})\n"
        f"open({str(log)!r}, 'a').write(f'{{i}} {{start}} {{time.monotonic()}}\\n')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("devices, runs_per_gpu", [(3, 1), (2, 2)])
def test_concurrent_processes_never_share_a_gpu_beyond_its_slots(tmp_path, devices, runs_per_gpu):
    gpus = [f"GPU-{i}" for i in range(devices)]
    log = tmp_path / "held.log"
    procs = [
        holder(tmp_path / "leases", gpus, runs_per_gpu, 0.6, log)
        for _ in range(devices * runs_per_gpu + 2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    held = [
        (int(i), float(a), float(b)) for i, a, b in map(str.split, log.read_text().splitlines())
    ]
    assert len(held) == len(procs)
    for gpu in range(devices):
        spans = [(a, b) for i, a, b in held if i == gpu]
        for t, _ in spans:  # at each start, how many hold this GPU
            assert sum(a <= t < b for a, b in spans) <= runs_per_gpu, (gpu, spans)
    # A GPU takes a second run only while every GPU has one (leases spread before they stack),
    # and the two extra processes waited.
    for gpu, t, _ in held:
        load = [sum(a <= t < b for j, a, b in held if j == g) for g in range(devices)]
        assert load[gpu] == 1 or min(load) >= 1, (gpu, t, held)
    assert sum("waiting for a GPU" in err for _, err in outputs) >= 2


def test_a_killed_holders_gpu_goes_to_the_next_process(tmp_path):
    log = tmp_path / "held.log"
    first = holder(tmp_path / "leases", ["0"], 1, 3600, log)
    assert first.stdout.readline().strip() == "0"
    second = holder(tmp_path / "leases", ["0"], 1, 0, log)
    assert "waiting for a GPU" in second.stderr.readline()  # the one GPU is held
    time.sleep(0.5)
    assert second.poll() is None
    first.kill()
    first.wait()
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0 and out.strip() == "0", err
    assert "leased GPU 0" in err
