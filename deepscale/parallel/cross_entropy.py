"""Cross-entropy over logits whose vocabulary is split across the tensor-parallel group.

No rank ever holds the whole ``(tokens, vocab)`` logits: three all-reduces of per-token
scalars (the maximum, the sum of exponentials and the target's logit) give the exact loss
(Megatron-LM's vocab-parallel cross-entropy). The backward pass reuses this rank's softmax
slice, so the extra memory is one copy of the local logits.
"""
import torch

from deepscale import comm as dist
from deepscale.parallel.mappings import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, ignore_index):
        logits = logits.float()
        world = group_size(group)
        token_max = logits.max(dim=-1).values
        if world > 1:
            dist.all_reduce(token_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - token_max.unsqueeze(-1)
        local_vocab = logits.shape[-1]
        ignored = target == ignore_index
        mine = (target >= vocab_start) & (target < vocab_start + local_vocab) & ~ignored
        local_target = (target - vocab_start).masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * mine
        exp = shifted.exp_()  # shifted is a fresh tensor: reuse its memory
        sum_exp = exp.sum(dim=-1)
        if world > 1:
            # One collective for two per-token quantities.
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local_target, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, mine, ignored = ctx.saved_tensors
        grad = softmax.clone()
        flat = grad.view(-1, grad.shape[-1])
        rows = torch.arange(flat.shape[0], device=grad.device)
        flat[rows, local_target.view(-1)] -= mine.view(-1).to(grad.dtype)
        grad.mul_((grad_loss * (~ignored)).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None, vocab_start=None,
                                 ignore_index: int = -100, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of ``target`` under logits split along the vocabulary.

    Args:
        logits: this rank's slice ``(..., local_vocab)`` (e.g. a
            :class:`~deepscale.parallel.layers.ColumnParallelLinear` output with
            ``gather_output=False``). Any float dtype; the loss is computed in fp32.
        target: int64 ids ``(...)`` into the whole vocabulary.
        tp_group: the tensor-parallel group the vocabulary is split over (None: default group).
        vocab_start: first vocabulary id of this rank's slice. Default: equal slices
            (``rank * local_vocab``); pass the layer's ``vocab_start`` / offset for unequal ones.
        ignore_index: targets with this value contribute 0 and no gradient. Default -100.
        reduction: ``"none"`` (per-token losses), ``"sum"`` or ``"mean"`` (over non-ignored
            tokens, like ``torch.nn.functional.cross_entropy``). Default ``"none"``.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be 'none', 'sum' or 'mean', got "
                         f"{reduction!r}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} disagree on the leading dimensions")
    if vocab_start is None:
        vocab_start = group_rank(tp_group) * logits.shape[-1]
    loss = _VocabParallelCrossEntropy.apply(logits, target, tp_group, int(vocab_start), ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)
