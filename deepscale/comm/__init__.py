"""Communication: process-group set-up, collective wrappers and the parallel topology.

``import deepscale.comm as dist`` mirrors the torch.distributed functions users call.
"""
from deepscale.comm.comm import (DEFAULT_TIMEOUT, ReduceOp, all_gather, all_gather_into_tensor, all_gather_object,
                                 all_reduce, all_to_all_single, barrier, broadcast, broadcast_object_list,
                                 collective_label, configure_watchdog, destroy_process_group, gather, get_backend,
                                 get_global_rank, get_local_rank, get_rank, get_watchdog, get_world_group,
                                 get_world_size, init_distributed, irecv, is_available, is_initialized, isend,
                                 new_group, recv, reduce, reduce_scatter, reduce_scatter_tensor, scatter, send,
                                 set_training_step)
from deepscale.comm.comms_hook import comms_logger, configure, log_summary, reset_comms_log
from deepscale.comm.topology import AXIS_ORDER, ParallelTopology, ProcessGroups

__all__ = [name for name in dir() if not name.startswith("_")]
