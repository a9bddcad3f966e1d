"""Op builders: compile deepscale's C++/CUDA kernels ahead of time or on first use.

``ALL_OPS`` maps each op name to its builder class; ``get_builder(name)`` returns an instance.
"""
from op_builder.builder import Compatibility, OpBuilder, OpBuildError, cache_root, csrc_root, installed_ops
from op_builder.cpu_optim import CPUAdagradBuilder, CPUAdamBuilder, CPULionBuilder
from op_builder.fused_adam import FusedAdamBuilder
from op_builder.async_io import AsyncIOBuilder
from op_builder.async_io_uring import AsyncIOUringBuilder
from op_builder.attention import CPUAttentionBuilder, FlashAttnBuilder

ALL_OPS = {b.NAME: b for b in (CPUAdamBuilder, CPUAdagradBuilder, CPULionBuilder, FusedAdamBuilder, AsyncIOBuilder,
                               AsyncIOUringBuilder, CPUAttentionBuilder, FlashAttnBuilder)}


def get_builder(name):
    """An instance of the builder of op ``name`` (one of ``ALL_OPS``)."""
    if name not in ALL_OPS:
        raise ValueError(f"unknown op {name!r}; allowed: {', '.join(sorted(ALL_OPS))}")
    return ALL_OPS[name]()


__all__ = ["OpBuilder", "OpBuildError", "Compatibility", "ALL_OPS", "get_builder", "cache_root", "csrc_root",
           "installed_ops", "CPUAdamBuilder", "CPUAdagradBuilder", "CPULionBuilder", "FusedAdamBuilder",
           "AsyncIOBuilder", "AsyncIOUringBuilder", "CPUAttentionBuilder", "FlashAttnBuilder"]
