"""Where a command's arithmetic runs: the device, CPU threads and the allocator."""

from __future__ import annotations

import ctypes
import os

import torch

from . import distributed
from .config import Config
from .errors import ConfigError
from .leases import lease_gpu


def resolve_device(name: str, runs_per_gpu: int = 1) -> torch.device:
    """`auto` picks CUDA when present and the CPU otherwise (device_tags records which). An
    explicit CUDA device on a machine without one is an error: a GPU job that lands on a node
    without a working GPU would otherwise run for days on its CPUs.
    Under torchrun each process takes the GPU of its LOCAL_RANK; otherwise `cuda` (or `auto`) is a
    lease of one of the visible GPUs (lease_gpu), so the workers of `dvc queue start -j 8` on an
    8-GPU node train on 8 GPUs; `cuda:N` is device N, no lease asked. The chosen GPU becomes the
    current device, so no library opens a context on GPU 0 besides it."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device: {name!r} asked for, but CUDA is not available here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use cpu or auto"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if distributed.world_size() > 1:
        device = torch.device("cuda", distributed.local_rank())
    elif name == "cuda":
        device = torch.device("cuda", lease_gpu(visible_gpus(), runs_per_gpu))
    elif int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(
            f"device: {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA "
            "devices"
        )
    else:
        device = torch.device(name)
    torch.cuda.set_device(device)
    return device


def device_tags(device: torch.device, requested: str) -> dict[str, str]:
    """What a run computed on, as MLflow tags: the device asked for and the one used (`auto` on
    a machine without CUDA: cpu) and, on a GPU, its name and UUID, which say which physical GPU
    it was whatever CUDA_VISIBLE_DEVICES numbered it."""
    tags = {"device_requested": requested, "device": str(device)}
    if device.type == "cuda":
        tags["gpu_name"] = torch.cuda.get_device_name(device)
        tags["gpu_uuid"] = visible_gpus()[device.index]
    return tags


def matmul_precision(precision: str) -> None:
    """Sets float32 matrix products and convolutions, on CUDA, to IEEE fp32 (`fp32`, and `bf16`,
    whose autocast leaves some ops in float32) or TensorFloat-32 (`tf32`: a 10-bit mantissa,
    ~1e-3 relative error, on Ampere and newer GPUs). Set explicitly by every stage, since
    PyTorch's own default lets cuDNN convolutions run in TF32 while matrix products do not."""
    mode = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def visible_gpus() -> list[str]:
    """The UUID of each GPU this process sees: one name per physical device, however
    CUDA_VISIBLE_DEVICES spells it (indices, UUIDs, a subset), so processes that spell it
    differently still share one set of leases. The device index where a build reports no UUID."""
    return [
        str(torch.cuda.get_device_properties(i).uuid) or str(i)
        for i in range(torch.cuda.device_count())
    ]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters in glibc's <malloc.h>


def retain_freed_memory() -> None:
    """Has glibc's malloc keep freed memory for the process's next allocations. By default it maps
    every large block (a batch's activations, their gradients) afresh and unmaps it when freed, so
    each CPU training step page-faults all of them in again (docs/performance.md). The price: the
    process keeps its peak memory. A no-op without glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 1 << 30)  # blocks below 1 GiB come from the heap,
        mallopt(M_TRIM_THRESHOLD, 1 << 30)  # which keeps up to 1 GiB free at its top


def channels_last(device: torch.device) -> bool:
    """Whether training runs channels-last, the layout convolutions run fastest in: on GPUs and on
    CPUs whose oneDNN kernels are AVX-512 or newer. oneDNN's AVX2 kernel of the strided 1x1
    convolution's weight gradient writes out of bounds on channels-last inputs of fewer than 8
    channels (oneDNN issue #6035), as the shortcuts of resnets narrower than 8 have: with torch
    2.14.1 under ONEDNN_MAX_CPU_ISA=AVX2 a width-2 resnet18 corrupts the heap or hangs. Training
    stays NCHW there."""
    if device.type != "cpu":
        return True
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    older_isa = isa == "AVX" or isa.startswith(("SSE", "AVX2"))
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and not older_isa


def setup(cfg: Config) -> torch.device:
    """The device `cfg` asks for, with `cfg.workers` CPU threads, IEEE fp32 arithmetic (training
    sets its own precision around its steps) and, on the CPU, an allocator that keeps freed
    memory."""
    device = resolve_device(cfg.device, cfg.runs_per_gpu)
    matmul_precision("fp32")
    torch.set_num_threads(max(cfg.workers, 1))
    if device.type == "cpu":
        retain_freed_memory()
    return device
