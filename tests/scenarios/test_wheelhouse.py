"""benchmarks/wheelhouse.py: lipdd and its pinned dependencies as wheels, installed offline into
a fresh venv that has only PyTorch (as the lent GPU machine's image has), where lipdd runs."""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_STACK = re.compile(r"^(torch|torchvision|torchgen|functorch|triton|nvidia|cuda)([-_.]|$)")


def test_the_wheelhouse_installs_offline_beside_torch(tmp_path):
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        [sys.executable, ROOT / "benchmarks/wheelhouse.py", wheels, "--python-version", version],
        check=True,
    )
    names = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert {"lipdd", "mlflow", "dvc", "numpy", "nvidia_ml_py"} <= names
    assert not names & {"torch", "torchvision", "triton", "nvidia_cublas", "ruff"}

    # The "image": a fresh venv that sees this machine's PyTorch stack and nothing else of ours.
    subprocess.run([sys.executable, "-m", "venv", tmp_path / "venv"], check=True)
    image = tmp_path / "image"
    image.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if CUDA_STACK.match(entry.name) and not entry.name.startswith("nvidia_ml_py"):
            (image / entry.name).symlink_to(entry)
    venv_site = next((tmp_path / "venv/lib").glob("python*/site-packages"))
    (venv_site / "image.pth").write_text(f"{image}\n")

    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    bin_ = tmp_path / "venv/bin"
    subprocess.run(
        [bin_ / "python", "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        + sorted(map(str, wheels.glob("*.whl"))),
        check=True,
        env=offline,
    )
    env = {k: v for k, v in offline.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_}:/usr/bin:/bin"
    help_ = subprocess.run(["lipdd", "--help"], env=env, capture_output=True, text=True)
    assert help_.returncode == 0 and "train" in help_.stdout, help_.stderr
    imports = "import lipdd.train, lipdd.stats, lipdd.report, mlflow, dvc.repo, torch\n"
    imports += "print(torch.__file__)"
    found = subprocess.run(
        [bin_ / "python", "-c", imports], env=env, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().startswith(str(image)), found.stdout
    dvc = subprocess.run(["dvc", "--version"], env=env, capture_output=True, text=True)
    assert dvc.returncode == 0, dvc.stderr
