"""Stage-3 model-state memory estimates (Rajbhandari et al. 2020, section 3.1).

Per device: ``16 Psi / N`` of partitioned model states for mixed-precision Adam, plus the
largest layer gathered whole in the 16-bit dtype (``2 * largest_layer``) and, while the
gradient of that layer is reduced, the same again.
"""
from typing import Dict, List

import torch

from deepscale.runtime.zero.memory import planned_model_state_bytes


def _largest_layer(model) -> int:
    sizes = [sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in m.parameters(recurse=False))
             for m in model.modules()]
    return max(sizes or [0])


def estimate_zero3_model_states_mem_needs(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                          num_nodes: int = 1, cpu_offload: bool = False) -> Dict[str, float]:
    """Per-device and per-node bytes of the model states of ZeRO stage 3.

    Returns ``{"device_bytes": ..., "host_bytes_per_node": ...}``. With the optimizer offloaded
    the device keeps the 16-bit parameter partition (2 Psi / N; the gradient partition
    accumulates on the host) and each node's host the fp32 masters, states and gradient
    partition of its ranks (the memory planner's figures, ``runtime/offload/planner.py``).
    """
    return planned_model_state_bytes(total_params, 3, num_gpus_per_node, num_nodes, cpu_offload, largest_layer_params)


def estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node: int = 1, num_nodes: int = 1
                                                   ) -> List[Dict[str, float]]:
    """Print (and return) the stage-3 model-state memory of ``model`` with and without optimizer offload.

    Args:
        model: an ``nn.Module`` (partitioned or not).
        num_gpus_per_node: devices per node. Default 1.
        num_nodes: nodes. Default 1.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"estimate_zero3_model_states_mem_needs_all_live: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    largest = _largest_layer(model)
    print(f"ZeRO stage 3 model states for {total / 1e6:.1f}M parameters (largest layer {largest / 1e6:.1f}M) on "
          f"{num_nodes} node(s) x {num_gpus_per_node} device(s):")
    print("  per device | per node (host) | option")
    rows = []
    for offload in (True, False):
        est = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node, num_nodes, cpu_offload=offload)
        rows.append({"offload_optimizer": "cpu" if offload else "none", **est})
        print(f"  {est['device_bytes'] / 2**30:8.2f}GB | {est['host_bytes_per_node'] / 2**30:13.2f}GB | "
              f"offload_optimizer={'cpu' if offload else 'none'}")
    return rows
