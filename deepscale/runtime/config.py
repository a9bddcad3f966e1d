"""``deepscale.runtime.config``: DeepSpeed's module path of the config class.

``DeepSpeedConfig(config, mpu=None)`` builds the same validated :class:`deepscale.config.DeepScaleConfig`
as ``initialize`` does (batch sizes resolved against the data-parallel size of ``mpu`` or of the
world), so DeepSpeed clients that construct or type-check ``DeepSpeedConfig`` work unchanged.
"""
from deepscale.config import DeepScaleConfig

__all__ = ["DeepSpeedConfig", "DeepScaleConfig"]


class DeepSpeedConfig(DeepScaleConfig):
    """A validated DeepSpeed-format config built from a dict or a JSON path.

    Args:
        config: a dict, or the path of a JSON file.
        mpu: a model-parallel unit; its data-parallel size resolves the batch sizes. Default:
            the world size when torch.distributed is initialised, else 1.
        mesh_device: accepted for DeepSpeed compatibility; must be None.
    """

    def __init__(self, config, mpu=None, mesh_device=None):
        if mesh_device is not None:
            raise ValueError("DeepSpeedConfig(mesh_device=...) is not supported; set the parallel degrees in the "
                             "config instead")
        if mpu is not None:
            dp_world_size = mpu.get_data_parallel_world_size()
        else:
            from deepscale import comm as dist
            dp_world_size = dist.get_world_size() if dist.is_initialized() else 1
        parsed = DeepScaleConfig.from_source(config=config, dp_world_size=dp_world_size)
        # Adopt the validated state (fields, private attributes) of the parsed config.
        super().__init__(**{name: getattr(parsed, name) for name in type(parsed).model_fields})
        for name, value in (parsed.__pydantic_private__ or {}).items():
            setattr(self, name, value)
