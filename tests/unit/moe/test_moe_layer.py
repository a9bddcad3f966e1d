"""Single-process tests of deepscale.moe.layer.MoE: gating, capacity, dropless, residual."""
import math

import pytest
import torch

from deepscale.moe.gating import TopKGate, compute_capacity, top1gating, top2gating, topkgating
from deepscale.moe.layer import MoE

from moe._moe_helpers import distinct_experts, naive_moe


def _mlp(h=8, f=16):
    return torch.nn.Sequential(torch.nn.Linear(h, f), torch.nn.GELU(), torch.nn.Linear(f, h))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("expert", ["linear", "mlp", "odd"])
def test_output_matches_token_by_token_reference(k, drop_tokens, expert):
    torch.manual_seed(k)
    module = {"linear": torch.nn.Linear(8, 8), "mlp": _mlp(), "odd": torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 8))}[expert]
    moe = MoE(8, module, num_experts=4, k=k, drop_tokens=drop_tokens, capacity_factor=0.75, min_capacity=1)
    distinct_experts(moe)
    moe.deepspeed_moe.experts.use_grouped_mm = True  # "odd" (6 columns) falls back to the per-expert loop
    x = torch.randn(3, 7, 8)
    out, l_aux, counts = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive_moe(moe, x), rtol=1e-5, atol=1e-6)
    assert counts.sum().item() == 21 * k
    routing = moe.deepspeed_moe.last_routing
    if drop_tokens:
        cap = compute_capacity(21, 4, k, 0.75, 1)
        per_expert = torch.bincount(routing.expert_idx[routing.keep], minlength=4)
        assert per_expert.max().item() <= cap
        assert routing.keep.sum() < 21 * k  # capacity 0.75 must drop something
    else:
        assert routing.keep.all()


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_matmul_and_per_expert_loop_agree_in_values_and_grads(k):
    torch.manual_seed(0)
    moe = MoE(8, _mlp(), num_experts=4, k=k, drop_tokens=False)
    distinct_experts(moe)
    moe.eval()  # no gate noise: both runs route identically
    x = torch.randn(16, 8, requires_grad=True)
    results = []
    for grouped in (True, False):
        moe.zero_grad()
        x.grad = None
        moe.deepspeed_moe.experts.use_grouped_mm = grouped
        out, l_aux, _ = moe(x)
        (out.pow(2).sum() + l_aux).backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in moe.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_expert_without_tokens_gets_zero_gradient_and_no_error():
    torch.manual_seed(0)
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=1, drop_tokens=False)
    with torch.no_grad():  # every token to expert 2
        moe.deepspeed_moe.gate.wg.weight.zero_()
        moe.deepspeed_moe.gate.wg.weight[2] = 1.0
    x = torch.ones(5, 8)
    out, _, counts = moe(x)
    out.sum().backward()
    assert counts.tolist() == [0, 0, 5, 0]
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    assert torch.count_nonzero(experts[0].weight.grad) == 0
    assert torch.count_nonzero(experts[2].weight.grad) > 0


def test_top1_without_rts_keeps_earliest_tokens_and_aux_loss_formula():
    torch.manual_seed(0)
    logits = torch.zeros(10, 2)
    logits[:, 0] = 1.0  # all to expert 0
    gate = TopKGate(4, 2, k=1, capacity_factor=1.0, min_capacity=1, use_rts=False)
    from deepscale.moe.gating import route_top1
    routing = route_top1(logits, 1.0, 1, use_rts=False)
    assert routing.capacity == 5
    assert routing.keep[:, 0].tolist() == [True] * 5 + [False] * 5
    gates = torch.softmax(logits, 1)
    expected = (gates.mean(0) * torch.tensor([1.0, 0.0])).sum() * 2
    torch.testing.assert_close(routing.l_aux, expected)
    assert gate.wg.weight.shape == (2, 4)


def test_rts_keeps_a_random_subset():
    logits = torch.zeros(40, 2)
    logits[:, 0] = 1.0
    from deepscale.moe.gating import route_top1
    torch.manual_seed(3)
    kept = route_top1(logits, 1.0, 1, use_rts=True).keep[:, 0]
    assert kept.sum() == 20
    assert kept[20:].any()  # not simply the first 20


def test_top2_first_choices_take_capacity_first():
    from deepscale.moe.gating import route_top2
    # token 0 picks experts (1, 0); tokens 1, 2 pick (0, 1): capacity 2 on expert 0 goes to tokens 1 and 2
    logits = torch.tensor([[1.0, 2.0], [2.0, 1.0], [2.0, 1.0]])
    routing = route_top2(logits, capacity_factor=2 / 3, min_capacity=1, second_expert_sampling=False)
    assert routing.capacity == 2
    assert routing.expert_idx.tolist() == [[1, 0], [0, 1], [0, 1]]
    assert routing.keep.tolist() == [[True, False], [True, True], [True, False]]
    # weights renormalised over the kept assignments
    torch.testing.assert_close(routing.weights[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(routing.weights[1].sum(), torch.tensor(1.0))


def test_dense_gating_tuples_match_routing():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    for fn, k in ((lambda lg: top1gating(lg, 1.0, 1, use_rts=False), 1),
                  (lambda lg: top2gating(lg, 1.0, 1, top2_2nd_expert_sampling=False), 2),
                  (lambda lg: topkgating(lg, 3, 1.0, 1), 3)):
        l_aux, combine, dispatch, counts = fn(logits)
        assert combine.shape[:2] == (12, 4) and dispatch.dtype == torch.bool
        assert counts.sum() == 12 * k
        per_expert = dispatch.sum(dim=(0, 2))
        assert per_expert.max() <= compute_capacity(12, 4, k, 1.0, 1)
        assert torch.all(dispatch.sum(dim=2) <= 1)  # one slot per (token, expert)
        assert torch.isfinite(l_aux)


def test_dense_combine_equals_sparse_dispatch():
    torch.manual_seed(1)
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=2, capacity_factor=0.8, min_capacity=1)
    distinct_experts(moe)
    moe.eval()
    x = torch.randn(10, 8)
    out, _, _ = moe(x)
    combine, dispatch = moe.deepspeed_moe.last_routing.to_dense()
    dispatched = torch.einsum("sec,sm->ecm", dispatch.float(), x)
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    expert_out = torch.stack([experts[e](dispatched[e]) for e in range(4)])
    torch.testing.assert_close(out, torch.einsum("sec,ecm->sm", combine, expert_out), rtol=1e-5, atol=1e-6)


def test_residual_mixes_dense_mlp_and_moe():
    torch.manual_seed(0)
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=2, k=1, use_residual=True, drop_tokens=False)
    distinct_experts(moe)
    moe.eval()
    x = torch.randn(6, 8)
    out, _, _ = moe(x)
    coef = torch.softmax(moe.coefficient(x), dim=-1)
    expected = naive_moe(moe, x) * coef[:, :1] + moe.mlp(x) * coef[:, 1:]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    names = {n for n, _ in moe.named_parameters()}
    assert {"mlp.weight", "coefficient.weight", "deepspeed_moe.gate.wg.weight",
            "deepspeed_moe.experts.deepspeed_experts.1.weight"} <= names


def test_used_token_masks_tokens_out():
    torch.manual_seed(0)
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=2, k=1, drop_tokens=False)
    x = torch.randn(6, 8)
    used = torch.tensor([1, 0, 1, 0, 1, 1])
    out, _, counts = moe(x, used_token=used)
    assert counts.sum() == 4
    assert torch.all(out[1] == 0) and torch.all(out[3] == 0)


def test_noisy_policies_and_eval_determinism():
    torch.manual_seed(0)
    for policy, k in (("Jitter", 1), ("RSample", 1), (None, 2)):
        moe = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=k, noisy_gate_policy=policy, drop_tokens=False)
        x = torch.randn(32, 8)
        out, _, _ = moe(x)  # training: noise applies
        assert out.shape == x.shape
        moe.eval()
        a, _, _ = moe(x)
        b, _, _ = moe(x)
        assert torch.equal(a, b)


def test_aux_loss_is_differentiable_through_the_gate():
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=4, k=2)
    _, l_aux, _ = moe(torch.randn(16, 8))
    l_aux.backward()
    assert moe.deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0


def test_expert_params_are_marked():
    from deepscale.moe.utils import is_moe_param
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=4)
    experts = list(moe.deepspeed_moe.experts.parameters())
    assert len(experts) == 8 and all(is_moe_param(p) and p.group_name == "ep_size_1" for p in experts)
    assert not is_moe_param(moe.deepspeed_moe.gate.wg.weight)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=3, ep_size=2), "divisible"),
    (dict(num_experts=4, noisy_gate_policy="gauss"), "noisy_gate_policy"),
    (dict(num_experts=4, k=5), "k must"),
    (dict(num_experts=4, k=2, noisy_gate_policy="RSample"), "RSample"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=2, enable_expert_tensor_parallelism=True), "tensor_parallelism"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, torch.nn.Linear(8, 8), **kwargs)


def test_capacity_formula():
    assert compute_capacity(100, 8, 1, 1.0, 4) == math.ceil(100 / 8)
    assert compute_capacity(100, 8, 2, 1.25, 4) == math.ceil(2 * 100 / 8 * 1.25)
    assert compute_capacity(4, 8, 1, 1.0, 4) == 4


def test_moe_param_group_helpers():
    from deepscale.moe.utils import (configure_moe_param_groups, has_moe_layers, is_moe_param_group,
                                     split_params_grads_into_shared_and_expert_params)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), MoE(8, torch.nn.Linear(8, 8), num_experts=4))
    assert has_moe_layers(model) == (True, 4)
    assert has_moe_layers(torch.nn.Linear(2, 2)) == (False, 0)
    groups = configure_moe_param_groups(list(model.parameters()))
    assert [g["name"] for g in groups] == ["dense-params", "dense-params_ep_size_1"]
    assert [is_moe_param_group(g) for g in groups] == [False, True]
    assert len(groups[1]["params"]) == 8
    assert configure_moe_param_groups(list(groups)) == list(groups)  # already split: unchanged
    out, l_aux, _ = model[1](model[0](torch.randn(4, 8)))
    (out.sum() + l_aux).backward()
    shared, expert = split_params_grads_into_shared_and_expert_params(list(model.parameters()))
    assert len(expert) == 8 and len(shared) == 3
    with pytest.raises(TypeError, match="non-empty list"):
        configure_moe_param_groups(model.parameters())


def test_input_width_must_match_hidden_size():
    moe = MoE(8, torch.nn.Linear(8, 8), num_experts=2)
    with pytest.raises(ValueError, match="hidden_size is 8"):
        moe(torch.randn(3, 6))
