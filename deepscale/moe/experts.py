"""The local experts of a mixture-of-experts layer, run over variable token counts.

Note: grouped matmul. The tokens reaching this rank arrive sorted by local expert, ``counts[i]``
rows for expert ``i``. When every expert is a chain of ``nn.Linear`` layers and elementwise
activations (``nn.Linear``, or an ``nn.Sequential`` of ``Linear``/``ReLU``/``GELU``/``SiLU``/...),
each ``Linear`` of the chain runs for all experts at once as one grouped matmul
(``torch.nn.functional.grouped_mm`` with the row offsets of each expert) on the concatenated rows,
without padding to a capacity: MegaBlocks' dropless formulation (Gale et al. 2022) with a grouped
GEMM instead of block-sparse kernels. Other experts (any ``nn.Module``) are called one by one on
their rows. Either way every local expert runs on every step, with zero rows when it got no
tokens, so all ranks issue the same collectives whatever the routing.

Note: ZeRO-3. The container is marked as a ZeRO-3 leaf (``utils/zero3_leaf.py``): its hooks
gather all local experts' parameters together when the container runs, which it does on every
step on every rank, so an expert without tokens never leaves a peer waiting in a gather.
"""
import copy
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from deepscale.utils.zero3_leaf import LEAF_ATTR

__all__ = ["Experts", "linear_chain"]

_ELEMENTWISE = (torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Identity,
                torch.nn.LeakyReLU, torch.nn.ReLU6, torch.nn.Mish, torch.nn.Dropout)


def linear_chain(module: torch.nn.Module) -> Optional[List[torch.nn.Module]]:
    """The layers of ``module`` if it is a ``Linear`` or a ``Sequential`` of ``Linear`` layers and
    elementwise activations (at least one ``Linear``); None otherwise."""
    if isinstance(module, torch.nn.Linear):
        return [module]
    if type(module) is not torch.nn.Sequential:
        return None
    layers = list(module)
    if not layers or not all(isinstance(m, (torch.nn.Linear,) + _ELEMENTWISE) for m in layers):
        return None
    if not any(isinstance(m, torch.nn.Linear) for m in layers):
        return None
    return layers


def _grouped_mm_usable(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cpu" and x.dtype != torch.float32:
        return False
    # the kernels need every row stride to be a multiple of 16 bytes
    align = 16 // x.element_size()
    return all(w.shape[0] % align == 0 and w.shape[1] % align == 0 for w in weights)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward
    rejects the expanded gradients some reductions produce)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Experts(torch.nn.Module):
    """``num_local_experts`` copies of ``expert`` (as DeepSpeed, ``deepspeed_experts`` is their list).

    Their parameters are marked as expert parameters: ``allreduce = False`` and ``group_name =
    expert_group_name`` (the registry name of their expert-data-parallel group).

    Args:
        expert: the expert module to copy.
        num_local_experts: experts on this rank. Default 1.
        expert_group_name: name of the expert process groups. Default None.
    """

    def __init__(self, expert: torch.nn.Module, num_local_experts: int = 1, expert_group_name: Optional[str] = None):
        super().__init__()
        self.deepspeed_experts = torch.nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        #: run chains of Linear layers as grouped matmuls: True, False (call each expert on its
        #: rows) or None (automatic: on accelerators; on CPU torch's grouped_mm is a loop of
        #: matmuls over the whole batch, slower than calling the experts on their rows)
        self.use_grouped_mm = None
        for param in self.deepspeed_experts.parameters():
            param.allreduce = False
            param.group_name = expert_group_name
        setattr(self, LEAF_ATTR, True)

    def forward(self, inputs: torch.Tensor, counts: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run expert ``i`` on rows ``[sum(counts[:i]), sum(counts[:i+1]))`` of ``inputs``.

        ``counts`` defaults to equal chunks. Returns the outputs in the same row order.
        """
        if counts is None:
            if inputs.shape[0] % self.num_local_experts:
                raise ValueError(f"{inputs.shape[0]} rows do not split evenly over {self.num_local_experts} experts")
            counts = [inputs.shape[0] // self.num_local_experts] * self.num_local_experts
        counts = [int(c) for c in counts]
        if len(counts) != self.num_local_experts or sum(counts) != inputs.shape[0]:
            raise ValueError(f"counts {counts} do not match {self.num_local_experts} experts and "
                             f"{inputs.shape[0]} rows")
        chains = [linear_chain(e) for e in self.deepspeed_experts]
        grouped = self.use_grouped_mm if self.use_grouped_mm is not None else inputs.device.type != "cpu"
        if grouped and all(c is not None for c in chains):
            out = self._grouped(inputs, counts, chains)
            if out is not None:
                return out
        return self.run_each(inputs, counts)

    def run_each(self, inputs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """The per-expert loop: each expert on its own rows (zero rows included)."""
        outputs = [expert(chunk) for expert, chunk in zip(self.deepspeed_experts, torch.split(inputs, list(counts)))]
        return torch.cat(outputs, dim=0)

    def _grouped(self, inputs: torch.Tensor, counts: List[int], chains) -> Optional[torch.Tensor]:
        offsets = torch.tensor(counts, device=inputs.device).cumsum(0).to(torch.int32)
        h = inputs
        for position, layer in enumerate(chains[0]):
            if not isinstance(layer, torch.nn.Linear):
                h = layer(h)  # elementwise: the same for every expert (copies of one module)
                continue
            weights = [chain[position].weight for chain in chains]
            if not _grouped_mm_usable(h, weights):
                return None
            stacked = torch.stack(weights).transpose(1, 2)  # [L, in, out]
            h = F.grouped_mm(_ContiguousGrad.apply(h.contiguous()), stacked, offs=offsets)
            h = _ContiguousGrad.apply(h)
            if layer.bias is not None:  # per expert segment: no per-row bias tensor, cheap backward
                h = torch.cat([segment + chain[position].bias
                               for segment, chain in zip(torch.split(h, counts), chains)])
        return h
