"""Pipeline parallelism: ``PipelineModule``, its layer specs and topologies, schedules and the engine.

``deepscale.runtime.pipe`` is also DeepSpeed's path (``deepspeed.runtime.pipe``); ``deepscale.pipe``
re-exports the names users import. See docs/pipeline.md.
"""
from deepscale.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from deepscale.runtime.pipe.schedules import SCHEDULES, Instruction, Op, Schedule, eval_schedule, train_schedule
from deepscale.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "ProcessTopology", "PipeDataParallelTopology",
           "PipeModelDataParallelTopology", "SCHEDULES", "Schedule", "Instruction", "Op", "train_schedule",
           "eval_schedule"]
