"""``compile``: DeepCompile settings."""
from typing import List, Optional

from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Int, choice

CompilePass = choice("z1", "z3", "autosp")


class CompileConfig(ConfigSection):
    """``compile``: DeepCompile, graph-level ZeRO optimisations through ``torch.compile``.
    ``deepcompile`` turns it on; the other keys tune it."""

    deepcompile: Bool = False
    free_activation: Bool = False
    free_activation_threshold: Int = Field(10 * 1024 * 1024, ge=0)
    offload_activation: Bool = False
    offload_opt_states: Bool = False
    double_buffer: Bool = True
    symmetric_memory: Bool = False
    debug_log: Bool = False
    offload_parameters: Bool = False
    sync_before_reduce: Bool = False
    sync_after_reduce: Bool = False
    sync_before_allgather: Bool = False
    sync_after_allgather: Bool = False
    keep_int_input_tensors: Bool = True
    keep_all_input_tensors: Bool = False
    passes: Optional[List[CompilePass]] = None
