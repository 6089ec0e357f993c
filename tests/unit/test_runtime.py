"""lipdd.runtime: which device a command runs on, what its run says about it, and the arithmetic
each stage sets."""

import pytest
import torch

from lipdd import runtime
from lipdd.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_an_explicit_cuda_device_without_cuda_is_an_error(name):
    with pytest.raises(ConfigError, match=f"device: '{name}' asked for, but CUDA is not avai"):
        runtime.resolve_device(name)


@no_cuda
def test_auto_falls_back_to_the_cpu_and_the_tags_say_so():
    device = runtime.resolve_device("auto")
    assert device == torch.device("cpu")
    assert runtime.device_tags(device, "auto") == {"device_requested": "auto", "device": "cpu"}


def test_every_stage_sets_ieee_fp32_and_training_may_ask_for_tf32():
    # PyTorch's own default lets cuDNN convolutions use TF32; a stage sets IEEE explicitly.
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    runtime.matmul_precision("tf32")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    for precision in ("fp32", "bf16"):  # bf16 autocasts; what it leaves in float32 is IEEE
        runtime.matmul_precision("tf32")
        runtime.matmul_precision(precision)
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
