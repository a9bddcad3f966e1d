"""``deepscale.ops.op_builder``: the op builders under the module path DeepSpeed users import.

Re-exports the top-level ``op_builder`` package (``CPUAdamBuilder``, ``AsyncIOBuilder``, ...).
"""
from op_builder import (ALL_OPS, AsyncIOBuilder, AsyncIOUringBuilder, Compatibility, CPUAdagradBuilder, CPUAdamBuilder, CPULionBuilder,
                        FusedAdamBuilder, OpBuilder, OpBuildError, get_builder)

__all__ = ["ALL_OPS", "AsyncIOBuilder", "AsyncIOUringBuilder", "Compatibility", "CPUAdagradBuilder", "CPUAdamBuilder", "CPULionBuilder",
           "FusedAdamBuilder", "OpBuilder", "OpBuildError", "get_builder"]
