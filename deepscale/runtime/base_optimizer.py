"""DeepSpeed's name for the base of the engine's optimizer wrappers (``deepspeed.runtime.base_optimizer``).

Integrations tell an engine-managed optimizer from a plain torch one with ``isinstance(opt,
(torch.optim.Optimizer, DeepSpeedOptimizer))`` (Lightning Fabric does, before loading a
checkpoint's optimizer states). deepscale's wrapper, :class:`PrecisionOptimizer` (what
``initialize`` returns under fp16/bf16), derives from it; without masters ``initialize``
returns the torch optimizer itself, which the first half of such a check already covers.
"""


class DeepSpeedOptimizer:
    """Marker base class of the optimizer wrappers the engine returns (for ``isinstance`` checks)."""


ZeROOptimizer = DeepSpeedOptimizer  # DeepSpeed's name for the ZeRO optimizers' base
