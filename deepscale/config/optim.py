"""``optimizer`` and ``scheduler`` sections.

Only the shape is checked here. Whether ``type`` names a known optimizer or
schedule, and whether ``params`` suits it, is decided by the optimizer and
scheduler factories, which know the constructors.
"""
from typing import Any, Dict

from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Str


class OptimizerConfig(ConfigSection):
    """``optimizer``.

    Attributes:
        type: optimizer name, e.g. ``"AdamW"`` (matched case-insensitively by the factory). Required.
        params: keyword arguments for the optimizer; not checked here. Default ``{}``.
        legacy_fusion: DeepSpeed's switch for its older fused fp16 optimizer. Default False.
    """

    type: Str
    params: Dict[str, Any] = Field(default_factory=dict)
    legacy_fusion: Bool = False


class SchedulerConfig(ConfigSection):
    """``scheduler``.

    Attributes:
        type: learning-rate schedule name, e.g. ``"WarmupLR"``. Required.
        params: keyword arguments for the schedule; not checked here. Default ``{}``.
    """

    type: Str
    params: Dict[str, Any] = Field(default_factory=dict)
