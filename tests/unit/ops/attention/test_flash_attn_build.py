"""The CUDA attention op without a GPU: its kernels compile with nvcc for sm80 and sm90, and a
CPU-only torch gets a reason (the router then never picks it)."""
import os
import shutil

import pytest
import torch

from op_builder import FlashAttnBuilder, get_builder
from op_builder.attention import FLASH_ATTN_ARCHS
from op_builder.fused_adam import find_nvcc


def test_builder_is_registered_with_both_architectures():
    builder = get_builder("flash_attn")
    assert isinstance(builder, FlashAttnBuilder) and builder.is_cuda()
    flags = " ".join(builder.nvcc_args())
    assert all(f"code=sm_{arch}" in flags for arch in ("80", "90")) and FLASH_ATTN_ARCHS == ("80", "90")
    assert get_builder("cpu_attention").NAME == "cpu_attention"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="needs a C++ compiler")
def test_cpu_torch_gives_a_reason():
    compat = FlashAttnBuilder().is_compatible()
    if torch.version.cuda is None:
        assert not compat and ("without CUDA" in compat.reason or "nvcc" in compat.reason)


@pytest.mark.slow
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", FLASH_ATTN_ARCHS)
def test_kernels_compile_with_nvcc(tmp_path, arch):
    # Head dim 128 only, to keep the suite short; the op build compiles all four head dims.
    objects = FlashAttnBuilder().compile_kernel_objects(tmp_path, archs=(arch,), head_dim=128)
    assert len(objects) == 2 and all(o.is_file() and o.stat().st_size > 0 for o in objects)
