"""Monitor configuration: the four monitor sections of a config, parsed (DeepSpeed's ``deepspeed.monitor.config``)."""
from deepscale.config.monitors import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig

SECTIONS = {"tensorboard": TensorBoardConfig, "wandb": WandbConfig, "csv_monitor": CSVConfig, "comet": CometConfig}


class MonitorConfig:
    """The ``tensorboard``, ``wandb``, ``csv_monitor`` and ``comet`` sections; ``enabled`` if any is on."""

    def __init__(self, tensorboard, wandb, csv_monitor, comet):
        self.tensorboard, self.wandb, self.csv_monitor, self.comet = tensorboard, wandb, csv_monitor, comet

    @property
    def enabled(self) -> bool:
        return any(getattr(self, name).enabled for name in SECTIONS)


def get_monitor_config(param_dict) -> MonitorConfig:
    """Build a :class:`MonitorConfig` from a config dict or from any object with the four sections
    as attributes (a parsed ``DeepScaleConfig``)."""
    if isinstance(param_dict, MonitorConfig):
        return param_dict
    if isinstance(param_dict, dict):
        return MonitorConfig(**{name: cls(**param_dict.get(name, {})) for name, cls in SECTIONS.items()})
    try:
        return MonitorConfig(**{name: getattr(param_dict, name) for name in SECTIONS})
    except AttributeError as err:
        raise TypeError(f"monitor config: expected a config dict or a parsed config with the sections "
                        f"{sorted(SECTIONS)}, got {type(param_dict).__name__}") from err
