"""Training-algorithm sections: ``sparse_attention``, ``progressive_layer_drop``,
``eigenvalue``, ``curriculum_learning`` (the older form) and ``data_efficiency``."""
from typing import Any, Dict, List, Optional

from pydantic import Field

from deepscale.config.base import ConfigSection, FreeFormSection
from deepscale.config.fields import Bool, Float, Int, Str, choice


class SparseAttentionConfig(ConfigSection):
    """``sparse_attention``: block-sparse attention layouts. DeepSpeed has no
    ``enabled`` key here; the presence of the section turns it on. Each ``mode``
    reads a subset of the keys."""

    mode: choice("dense", "fixed", "variable", "bigbird", "bslongformer") = "fixed"
    block: Int = Field(16, ge=1)
    different_layout_per_head: Bool = False
    num_local_blocks: Int = Field(4, ge=1)
    num_global_blocks: Int = Field(1, ge=0)
    attention: choice("bidirectional", "unidirectional") = "bidirectional"
    horizontal_global_attention: Bool = False
    num_different_global_patterns: Int = Field(1, ge=1)
    num_random_blocks: Int = Field(0, ge=0)
    local_window_blocks: List[Int] = Field(default_factory=lambda: [4])
    global_block_indices: List[Int] = Field(default_factory=lambda: [0])
    global_block_end_indices: Optional[List[Int]] = None
    num_sliding_window_blocks: Int = Field(3, ge=1)


class ProgressiveLayerDropConfig(ConfigSection):
    """``progressive_layer_drop``: skip transformer layers with a growing probability."""

    enabled: Bool = False
    theta: Float = 1.0
    gamma: Float = 0.001


class EigenvalueConfig(ConfigSection):
    """``eigenvalue``: estimate the Hessian's top eigenvalue per layer (used by MoQ)."""

    enabled: Bool = False
    verbose: Bool = False
    max_iter: Int = Field(100, ge=1)
    tol: Float = Field(1e-2, gt=0)
    stability: Float = Field(1e-6, ge=0)
    gas_boundary_resolution: Int = Field(1, ge=1)
    layer_name: Str = "bert.encoder.layer"
    layer_num: Int = Field(0, ge=0)


class CurriculumLearningLegacyConfig(ConfigSection):
    """Top-level ``curriculum_learning``: DeepSpeed's older sequence-length curriculum."""

    enabled: Bool = False
    curriculum_type: Optional[Str] = None
    min_difficulty: Optional[Int] = None
    max_difficulty: Optional[Int] = None
    schedule_type: Optional[choice("fixed_discrete", "fixed_root", "fixed_linear", "custom")] = None
    schedule_config: Dict[str, Any] = Field(default_factory=dict)


class EnabledFreeForm(FreeFormSection):
    """A sub-section with an ``enabled`` switch and library-specific keys
    (curriculum metrics, random-LTD schedules) that are passed through."""

    enabled: Bool = False


class DataSamplingConfig(ConfigSection):
    """``data_efficiency.data_sampling``."""

    enabled: Bool = False
    num_epochs: Int = Field(1000, ge=1)
    num_workers: Int = Field(0, ge=0)
    curriculum_learning: EnabledFreeForm = Field(default_factory=EnabledFreeForm)


class DataRoutingConfig(ConfigSection):
    """``data_efficiency.data_routing``."""

    enabled: Bool = False
    random_ltd: EnabledFreeForm = Field(default_factory=EnabledFreeForm)


class DataEfficiencyConfig(ConfigSection):
    """``data_efficiency``: curriculum data sampling and random layer-token drop."""

    enabled: Bool = False
    seed: Int = 1234
    data_sampling: DataSamplingConfig = Field(default_factory=DataSamplingConfig)
    data_routing: DataRoutingConfig = Field(default_factory=DataRoutingConfig)
