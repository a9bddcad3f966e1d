"""Training monitors: ``tensorboard``, ``wandb``, ``csv_monitor`` and ``comet``.

Defaults (including the job name ``DeepSpeedJobName``) match DeepSpeed so
existing log layouts stay the same.
"""
from typing import Optional

from pydantic import Field

from deepscale.config.base import ConfigSection
from deepscale.config.fields import Bool, Int, Str, choice


class TensorBoardConfig(ConfigSection):
    """``tensorboard``: write scalars for TensorBoard under ``output_path/job_name``."""

    enabled: Bool = False
    output_path: Str = ""
    job_name: Str = "DeepSpeedJobName"


class WandbConfig(ConfigSection):
    """``wandb``: log to Weights & Biases."""

    enabled: Bool = False
    group: Optional[Str] = None
    team: Optional[Str] = None
    project: Str = "deepspeed"


class CSVConfig(ConfigSection):
    """``csv_monitor``: write one CSV file per metric under ``output_path/job_name``."""

    enabled: Bool = False
    output_path: Str = ""
    job_name: Str = "DeepSpeedJobName"


class CometConfig(ConfigSection):
    """``comet``: log to Comet; unset fields fall back to Comet's own configuration."""

    enabled: Bool = False
    samples_log_interval: Int = Field(100, ge=1)
    project: Optional[Str] = None
    workspace: Optional[Str] = None
    api_key: Optional[Str] = None
    experiment_name: Optional[Str] = None
    experiment_key: Optional[Str] = None
    online: Optional[Bool] = None
    mode: Optional[choice("get_or_create", "create", "get")] = None
