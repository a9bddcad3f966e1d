"""``deepscale.initialize``: the entry point that builds an Engine from a model and a config."""
from deepscale import comm as dist
from deepscale.utils.logging import logger


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port: int = 29500, mpu=None, dist_init_required=None,
               collate_fn=None, config=None, mesh_param=None, config_params=None):
    """Build a training engine around ``model``.

    Args:
        args: argparse namespace; ``args.deepscale_config`` or ``args.deepspeed_config`` may
            name the config file (see :func:`deepscale.add_config_arguments`).
        model: the ``torch.nn.Module`` to train. Required.
        optimizer: a ``torch.optim.Optimizer``, or a callable that takes the parameters and
            returns one; wins over the config's ``optimizer`` section.
        model_parameters: parameters (or param-group dicts) for the config's optimizer.
            Default: the model's trainable parameters.
        training_data: a torch ``Dataset``; a distributed loader over it is returned.
        lr_scheduler: a scheduler, or a callable taking the optimizer; wins over the config.
        distributed_port: rendezvous port when MASTER_PORT is unset. Default 29500.
        mpu: a model-parallel unit (Megatron style) giving the data-parallel group.
        dist_init_required: ``False`` skips torch.distributed initialisation.
        collate_fn: collate function for the training loader.
        config: a dict or the path of a JSON config (DeepSpeed format).
        mesh_param: accepted for DeepSpeed compatibility; must be None.
        config_params: a dict config (DeepSpeed's older name for ``config``).

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)``; the loader and scheduler
        are None when not requested.

    Raises:
        InitializeArgumentError: no model, the model passed positionally (where ``args``
            goes), no config or two configs, or a ZeRO stage without an optimizer. It derives from both ``ValueError`` and
            ``AssertionError``, because DeepSpeed asserts these and its callers catch that.
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    import torch
    from deepscale.config.errors import InitializeArgumentError
    if model is None and isinstance(args, torch.nn.Module):
        raise InitializeArgumentError(
            f"deepscale.initialize: a {type(args).__name__} was passed as the first positional argument, which is "
            "'args' (the argparse namespace); pass the model by keyword: initialize(model=..., ...)")
    if model is None:
        raise InitializeArgumentError("deepscale.initialize: model is required (pass model=your_nn_module)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"deepscale.initialize: model must be a torch.nn.Module, got {type(model).__name__}")
    if mesh_param is not None:
        raise ValueError("deepscale.initialize: mesh_param is not supported yet; set the parallel degrees in the "
                         "config instead")
    dist.init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required,
                          verbose=False)
    from deepscale.config import DeepScaleConfig
    from deepscale.config.loader import load_config_dict
    from deepscale.runtime.engine import Engine
    from deepscale.runtime.model_parallel_setup import apply_config_autotp, grid_for_config
    raw_config = None
    if _is_pipeline_module(model):  # 3D: the module's topology, the config and any mpu must agree
        from deepscale.runtime.pipe.tp_compose import pipeline_mpu
        mpu = pipeline_mpu(model, load_config_dict(config=config, config_params=config_params, args=args), mpu)
    elif mpu is None:  # tensor/sequence parallel degrees in the config: build their process groups
        raw_config = load_config_dict(config=config, config_params=config_params, args=args)
        mpu = grid_for_config(raw_config)
    if mpu is not None:
        from deepscale.utils import groups
        groups.mpu = mpu  # DeepSpeed clients ask deepscale.utils.groups for the data-parallel group
    dp_world_size = mpu.get_data_parallel_world_size() if mpu is not None else dist.get_world_size()
    if _is_pipeline_module(model):  # its topology gives the data-parallel degree; the pipeline engine runs it
        from deepscale.runtime.pipe.engine import PipelineEngine as Engine  # noqa: F811
        dp_world_size = max(model.topology().get_dim("data"), 1)
    ds_config = DeepScaleConfig.from_source(config=config, config_params=config_params, args=args,
                                            dp_world_size=dp_world_size)
    if ds_config.zero_stage > 0 and optimizer is None and ds_config.optimizer is None:
        raise InitializeArgumentError(
            f"deepscale.initialize: zero_optimization.stage={ds_config.zero_stage} partitions optimizer state, so "
            "it needs an optimizer: add an 'optimizer' section to the config or pass optimizer= to initialize()")
    if raw_config is not None and mpu is not None:
        apply_config_autotp(model, raw_config, mpu)
    engine = Engine(model=model, config=ds_config, optimizer=optimizer, model_parameters=model_parameters,
                    lr_scheduler=lr_scheduler, training_data=training_data, collate_fn=collate_fn, mpu=mpu)
    if dist.get_rank() == 0:
        logger.info(f"deepscale engine: world={dist.get_world_size()} dp={engine.dp_world_size} "
                    f"micro_batch={ds_config.train_micro_batch_size_per_gpu} "
                    f"grad_accum={ds_config.gradient_accumulation_steps} dtype={engine.model_dtype}")
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _is_pipeline_module(model) -> bool:
    from deepscale.runtime.pipe.module import PipelineModule
    return isinstance(model, PipelineModule)
