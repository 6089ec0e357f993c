"""A wheelhouse of lipdd and every pinned dependency in requirements.lock except the CUDA stack
(torch, torchvision, triton, nvidia-* but nvidia-ml-py, cuda-*) and ruff, the linter, for a
Python that already has PyTorch and cannot download: the lent GPU machine (Python 3.12, PyTorch
2.11), or a cluster's compute nodes. Build it where pip reaches the package index, install
it there offline:

    .venv/bin/python benchmarks/wheelhouse.py .whl [--python-version 3.12] [--exclude numpy ...]
    python3 -m pip install --no-index --no-deps --no-compile .whl/*.whl   # there, or --target DIR

Every wheel is the lock's version for that Python on manylinux x86-64; a package published only
as source (pure Python) is built into a wheel here. `--exclude` leaves out packages the target
already has (the 64 MiB a GPU check may carry). The install is --no-deps: the lock already names
every package, and the target's own torch stays as it is.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def cuda_stack(name: str) -> bool:
    """Whether a package comes with the target's PyTorch (or is CI's linter, not lipdd's)."""
    return name in ("torch", "torchvision", "triton", "ruff") or (
        name.startswith(("nvidia-", "cuda-")) and name != "nvidia-ml-py"
    )


def pins(exclude: set[str]) -> list[str]:
    """name==version of every lock line the wheelhouse holds."""
    out = []
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = re.split(r"[=<>~! ;\[]", line, maxsplit=1)[0].lower().replace("_", "-")
        if not cuda_stack(name) and name not in exclude:
            out.append(line)
    return out


def fetch(wanted: list[str], out: Path, python_version: str) -> list[str]:
    """Downloads each pin's binary wheel for the target, or its source where it has none, in one
    pip call; builds every source into a wheel here, in another; returns the pins built."""
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    target = ["--python-version", python_version, "--implementation", "cp", *platforms]
    # --no-deps lets pip take a source archive where no wheel fits the target.
    download = [*pip, "download", "--no-deps", "--prefer-binary", *target, "-d", str(out)]
    fetched = subprocess.run([*download, *wanted], capture_output=True, text=True)
    if fetched.returncode != 0:
        raise SystemExit(f"wheelhouse: pip download failed:\n{fetched.stderr}")
    sources = sorted(p for p in out.iterdir() if p.name.endswith((".tar.gz", ".zip", ".tar.bz2")))
    if not sources:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        built = subprocess.run(
            [*pip, "wheel", "--no-deps", "-w", tmp, *map(str, sources)],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            raise SystemExit(f"wheelhouse: a source archive fails to build:\n{built.stderr}")
        for wheel in Path(tmp).glob("*.whl"):
            if not wheel.name.endswith("-none-any.whl"):  # built for this machine, not the target
                raise SystemExit(f"wheelhouse: {wheel.name} builds only a platform wheel here")
            wheel.replace(out / wheel.name)
    for source in sources:
        source.unlink()
    names = {re.split(r"[-_]", s.name.lower())[0] for s in sources}
    return [pin for pin in wanted if re.split(r"[-_=]", pin.lower())[0] in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--exclude", nargs="*", default=[], help="package names to leave out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = pins({n.lower().replace("_", "-") for n in args.exclude})
    built = fetch(wanted, args.out, args.python_version)
    with tempfile.TemporaryDirectory() as tmp:  # lipdd itself, from a copy of this checkout
        source = Path(tmp) / "src"  # (setuptools writes build/ into the tree it builds)
        shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source)
        subprocess.run(
            [sys.executable, "-m", "pip", "-q", "wheel", "--no-deps", "-w", tmp, str(source)],
            check=True,
        )
        for wheel in Path(tmp).glob("*.whl"):
            wheel.replace(args.out / wheel.name)
    size = sum(p.stat().st_size for p in args.out.glob("*.whl")) / 2**20
    print(
        f"wheelhouse: {len(wanted) + 1} wheels in {args.out} ({size:.0f} MiB) for Python "
        f"{args.python_version}" + (f"; built from source: {', '.join(built)}" if built else "")
    )


if __name__ == "__main__":
    main()
