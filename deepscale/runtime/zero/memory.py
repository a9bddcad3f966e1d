"""Memory of model states under ZeRO: the paper's estimates and a measurement of live buffers.

Note: the formulas. With Psi parameters, mixed-precision Adam and N data-parallel ranks
(Rajbhandari et al. 2020, section 3.1 and figure 1), a rank holds 2Psi bytes of fp16/bf16
parameters, 2Psi of gradients and K*Psi = 12Psi of fp32 master weights, momentum and variance.
Stage 1 divides the 12Psi by N (4Psi + 12Psi/N), stage 2 also the gradients
(2Psi + 14Psi/N), stage 3 everything (16Psi/N).
"""
from typing import Dict, List

import torch

BYTES_PER_PARAM_16BIT = 2
OPTIMIZER_STATE_BYTES_K = 12  # fp32 master (4) + Adam momentum (4) + variance (4)


def zero_model_state_bytes(num_params: int, stage: int, world_size: int) -> float:
    """Bytes of model states per rank for mixed-precision Adam, from the ZeRO paper.

    Args:
        num_params: Psi, the trainable parameter count.
        stage: ZeRO stage 0-3.
        world_size: N, the data-parallel ranks.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    psi, n, k = num_params, world_size, OPTIMIZER_STATE_BYTES_K
    params = 2 * psi / n if stage == 3 else 2 * psi
    grads = 2 * psi / n if stage >= 2 else 2 * psi
    states = k * psi / n if stage >= 1 else k * psi
    return params + grads + states


def _count_params(model) -> int:
    if isinstance(model, int):
        return model
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def estimate_zero2_model_states_mem_needs(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                          cpu_offload: bool = False) -> Dict[str, float]:
    """Per-device and per-node bytes for the model states of ZeRO stage 2.

    Returns ``{"device_bytes": ..., "host_bytes_per_node": ...}``. Without offload the device
    holds 2Psi + 14Psi/N; with the optimizer offloaded it keeps only the 16-bit parameters and
    gradient partition (2Psi + 2Psi/N) and each node's host memory holds the fp32 masters,
    states and gradient partition of its ranks (16Psi * ranks_per_node / N). These are the
    figures of the memory planner (``runtime/offload/planner.py``) for mixed-precision Adam.
    """
    return planned_model_state_bytes(total_params, 2, num_gpus_per_node, num_nodes, cpu_offload)


def planned_model_state_bytes(total_params: int, stage: int, num_gpus_per_node: int, num_nodes: int,
                              cpu_offload: bool, largest_layer: int = 0) -> Dict[str, float]:
    """The memory planner (``runtime/offload/planner.py``) with mixed-precision Adam's sizes."""
    from deepscale.runtime.offload.planner import MIXED_PRECISION_ADAM, plan_memory
    from deepscale.runtime.offload.settings import OptimizerOffloadSettings
    if num_gpus_per_node < 1 or num_nodes < 1:
        raise ValueError(f"num_gpus_per_node and num_nodes must be positive, got {num_gpus_per_node}, {num_nodes}")
    offload = OptimizerOffloadSettings(device="cpu" if cpu_offload else "none")
    plan = plan_memory(total_params, stage, num_gpus_per_node * num_nodes, num_gpus_per_node, MIXED_PRECISION_ADAM,
                       offload, largest_layer)
    return {"device_bytes": plan.device_bytes, "host_bytes_per_node": plan.host_bytes_per_node}


def estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node: int = 1, num_nodes: int = 1
                                                   ) -> List[Dict[str, float]]:
    """Print (and return) the stage-2 model-state memory of ``model`` with and without offload.

    Args:
        model: an ``nn.Module`` (its trainable parameters are counted) or a parameter count.
        num_gpus_per_node: devices per node. Default 1.
        num_nodes: nodes. Default 1.

    Returns:
        one dict per option: ``offload_optimizer``, ``device_bytes``, ``host_bytes_per_node``.
    """
    total = _count_params(model)
    rows = []
    print(f"ZeRO stage 2 model states for {total / 1e6:.1f}M parameters on {num_nodes} node(s) x "
          f"{num_gpus_per_node} device(s) (Rajbhandari et al. 2020):")
    print("  per device | per node (host) | option")
    for offload in (True, False):
        est = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node, num_nodes, cpu_offload=offload)
        option = "offload_optimizer=cpu" if offload else "offload_optimizer=none"
        rows.append({"offload_optimizer": "cpu" if offload else "none", **est})
        print(f"  {est['device_bytes'] / 2**30:8.2f}GB | {est['host_bytes_per_node'] / 2**30:13.2f}GB | {option}")
    return rows


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if not torch.is_tensor(tensor) or tensor.dim() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def live_model_state_bytes(zero_optimizer) -> Dict[str, int]:
    """Bytes of the live buffers of a :class:`ZeroOptimizer`, by kind.

    ``master`` counts separate fp32 master chunks (zero for fp32 models, whose masters are the
    model's own chunks), ``optimizer_states`` the elementwise states of the torch optimizer,
    ``gradients`` the persistent gradient storage, ``params`` the model buffers.
    """
    masters = zero_optimizer.masters
    model_ptrs = {b.untyped_storage().data_ptr() for b in zero_optimizer.model_buffers}
    separate = [m for m in masters if m.untyped_storage().data_ptr() not in model_ptrs]
    states = [v for m in masters for v in zero_optimizer.basic.state.get(m, {}).values()]
    return {
        "master": _unique_bytes(separate),
        "optimizer_states": _unique_bytes(states),
        "gradients": _unique_bytes([zero_optimizer.grads.storage]),
        "params": _unique_bytes(zero_optimizer.model_buffers),
    }
