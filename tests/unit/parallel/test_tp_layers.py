"""Tensor-parallel layers against dense PyTorch layers on gloo (fp32, tolerance 1e-5 relative / 1e-6 absolute).

Each rank builds the dense reference itself from the same seed, shards it with the layers'
``from_dense`` and compares outputs and gradients (shards against the matching slices).
"""
import pytest
import torch

from dist_harness import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), f"{what}: max diff {(a - b).abs().max().item()}"


def _mlp_body(sequence_parallel, uneven):
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepscale.parallel import (ColumnParallelLinear, RowParallelLinear, gather_sequence, scatter_sequence)
    tp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(1)
    x = torch.randn(2, 4 * tp, 6, requires_grad=True)
    fc, proj = torch.nn.Linear(6, 5 * tp), torch.nn.Linear(5 * tp, 6)
    ref = proj(F.gelu(fc(x)))
    (ref.square().sum()).backward()
    total = 5 * tp
    sizes = [total // tp] * tp if not uneven else [total // tp + 1] * (tp - 1) + [total // tp - (tp - 1)]
    start = sum(sizes[:rank])
    idx = torch.arange(start, start + sizes[rank])
    col = ColumnParallelLinear.from_dense(fc.weight, fc.bias, idx, sizes, sequence_parallel=sequence_parallel)
    row = RowParallelLinear.from_dense(proj.weight, proj.bias, idx, sizes, sequence_parallel=sequence_parallel)
    xin = x.detach().clone().requires_grad_()
    h = scatter_sequence(xin, None) if sequence_parallel else xin
    out = row(F.gelu(col(h)))
    out.square().sum().backward()
    full = gather_sequence(out.detach(), None) if sequence_parallel else out
    _close(full, ref, "output")
    _close(xin.grad, x.grad, "input grad")
    _close(col.weight.grad, fc.weight.grad[idx], "column weight grad")
    _close(col.bias.grad, fc.bias.grad[idx], "column bias grad")
    _close(row.weight.grad, proj.weight.grad[:, idx], "row weight grad")
    _close(row.bias.grad, proj.bias.grad, "row bias grad")
    assert col.weight.tensor_model_parallel and row.weight.partition_dim == 1
    return col.weight.numel()


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("uneven", [False, True])
def test_column_row_pair_matches_dense(sequence_parallel, uneven):
    sizes = run_distributed(_mlp_body, 2, args=(sequence_parallel, uneven))
    if not uneven:
        assert sizes == [5 * 6, 5 * 6]  # each rank holds half of the 10 x 6 weight


def _vocab_body(vocab, sequence_parallel):
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepscale.parallel import (VocabParallelEmbedding, gather_sequence, tie_column_to_embedding,
                                    vocab_parallel_cross_entropy)
    tp = dist.get_world_size()
    torch.manual_seed(2)
    emb = torch.nn.Embedding(vocab, 8)
    ids = torch.randint(0, vocab, (3, 2 * tp))
    target = torch.randint(0, vocab, (3, 2 * tp))
    target[0, :3] = -100
    logits = F.linear(emb(ids), emb.weight)
    ref = F.cross_entropy(logits.view(-1, vocab), target.view(-1), ignore_index=-100)
    ref.backward()
    pemb = VocabParallelEmbedding.from_dense(emb, sequence_parallel=sequence_parallel)
    head = tie_column_to_embedding(pemb, gather_output=False, sequence_parallel=sequence_parallel)
    assert head.weight is pemb.weight
    hidden = pemb(ids)
    local_logits = head(hidden)
    assert local_logits.shape[-1] == pemb.vocab_end - pemb.vocab_start
    per_token = vocab_parallel_cross_entropy(local_logits, target, None, vocab_start=pemb.vocab_start)
    n_valid = (target != -100).sum()
    loss = per_token.sum() / n_valid
    loss.backward()
    _close(loss, ref, "loss")
    _close(pemb.weight.grad, emb.weight.grad[pemb.vocab_start:pemb.vocab_end], "embedding grad")
    if not sequence_parallel:
        gathered = tie_column_to_embedding(pemb, gather_output=True)(hidden)
        _close(gathered, logits, "gathered logits")
    _close(vocab_parallel_cross_entropy(local_logits, target, None, pemb.vocab_start, reduction="mean"), ref,
           "mean reduction")
    return pemb.weight.shape[0]


@pytest.mark.parametrize("vocab, sequence_parallel", [(40, False), (37, False), (37, True)])
def test_vocab_parallel_embedding_and_cross_entropy(vocab, sequence_parallel):
    rows = run_distributed(_vocab_body, 2, args=(vocab, sequence_parallel))
    assert sum(rows) == vocab


def test_even_sizes_and_errors():
    from deepscale.parallel import even_sizes
    assert even_sizes(10, 4) == [3, 3, 2, 2]
    assert even_sizes(12, 2, unit=3) == [6, 6]
    with pytest.raises(ValueError, match="fewer pieces than ranks"):
        even_sizes(2, 4)
    from deepscale.parallel import ColumnParallelLinear
    with pytest.raises(ValueError, match="sizes"):
        ColumnParallelLinear(4, 6, output_sizes=[2, 2])


def test_native_construction_matches_seeded_dense_init():
    from deepscale.parallel import ColumnParallelLinear, RowParallelLinear
    torch.manual_seed(3)
    col = ColumnParallelLinear(4, 6)
    torch.manual_seed(3)
    row = RowParallelLinear(6, 4)
    assert col.weight.shape == (6, 4) and row.weight.shape == (4, 6)  # one rank: whole layers
    x = torch.randn(2, 4)
    assert torch.allclose(col(x), torch.nn.functional.linear(x, col.weight, col.bias))
