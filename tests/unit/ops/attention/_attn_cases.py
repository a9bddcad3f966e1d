"""Shared helpers of the attention tests (name kept distinct: tests/unit has no packages)."""
import torch

from deepscale.ops.attention import build_spec, reference_attention

# Max abs error against a float64 reference, per dtype, for unit-variance inputs (outputs and
# gradients are O(1)): fp32 accumulates in fp32; bf16/fp16 round inputs, outputs and gradients.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def make_inputs(lens_q, lens_k, heads, kv_heads, dim, dtype, varlen, seed=0, device="cpu"):
    """Random q, k, v (leaf tensors needing grad) and the varlen kwargs (empty when padded)."""
    gen = torch.Generator().manual_seed(seed)
    if varlen:
        shapes = ((sum(lens_q), heads), (sum(lens_k), kv_heads), (sum(lens_k), kv_heads))
        extra = {"cu_seqlens_q": torch.tensor([0] + list(_cumsum(lens_q)), dtype=torch.int32),
                 "cu_seqlens_k": torch.tensor([0] + list(_cumsum(lens_k)), dtype=torch.int32),
                 "max_seqlen_q": max(lens_q), "max_seqlen_k": max(lens_k)}
    else:
        shapes = ((len(lens_q), lens_q[0], heads), (len(lens_k), lens_k[0], kv_heads),
                  (len(lens_k), lens_k[0], kv_heads))
        extra = {}
    tensors = [torch.randn(*s, dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    if device != "cpu":
        extra = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in extra.items()}
    return [t.requires_grad_() for t in tensors], extra


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def float64_reference(q, k, v, grad_out, **options):
    """(out, lse, dq, dk, dv) of the float64 reference from the very same (rounded) inputs."""
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    options = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in options.items()}
    spec = build_spec(qd, kd, vd, **options)
    out, lse = reference_attention(qd, kd, vd, spec, return_lse=True)
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.double().cpu())
    return (out, lse) + tuple(grads)


def max_err(a, b):
    """Max abs difference (float64, on CPU); 0 for empty tensors."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()
