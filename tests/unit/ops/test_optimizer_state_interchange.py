"""deepscale's Adam optimizers keep torch's state layout, so a checkpoint of one resumes the other.

fp32 tolerance 2e-6: the implementations compute the same update in a different order.
"""
import copy

import pytest
import torch

from deepscale.ops.adagrad import DeepScaleCPUAdagrad
from deepscale.ops.adam import DeepScaleCPUAdam, FusedAdam

TOL = 2e-6
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (7, 33)]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(n, generator=gen) for n in (7, 33)]


def _steps(opt, steps):
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in steps:
        for p, g in zip(params, _grads(step)):
            p.grad = g.to(p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


ADAGRAD_HYPER = dict(lr=1e-2, eps=1e-10, weight_decay=0.1)


def _ours(kind, params):
    if kind == "cpu_adam":
        return DeepScaleCPUAdam(params, adamw_mode=True, **HYPER)
    if kind == "cpu_adagrad":
        return DeepScaleCPUAdagrad(params, **ADAGRAD_HYPER)
    return FusedAdam(params, adam_w_mode=True, **HYPER)


def _torch(kind, params):
    if kind == "cpu_adagrad":
        return torch.optim.Adagrad(params, **ADAGRAD_HYPER)
    return torch.optim.AdamW(params, **HYPER)


@pytest.mark.parametrize("kind", ["cpu_adam", "fused_adam"])
def test_state_layout_matches_torch_adamw(kind):
    ours, ref = _ours(kind, _params()), torch.optim.AdamW(_params(), **HYPER)
    got, want = _steps(ours, range(3)), _steps(ref, range(3))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)
    for p_ours, p_ref in zip(ours.param_groups[0]["params"], ref.param_groups[0]["params"]):
        s_ours, s_ref = ours.state[p_ours], ref.state[p_ref]
        assert sorted(s_ours) == sorted(s_ref) == ["exp_avg", "exp_avg_sq", "step"]
        assert torch.is_tensor(s_ours["step"]) and s_ours["step"].dtype == s_ref["step"].dtype
        assert float(s_ours["step"]) == float(s_ref["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s_ours[key], s_ref[key], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["cpu_adam", "fused_adam", "cpu_adagrad"])
def test_checkpoints_resume_across_implementations(kind):
    ours, ref = _ours(kind, _params()), _torch(kind, _params())
    _steps(ours, range(3))
    _steps(ref, range(3))
    uninterrupted = _steps(ref, range(3, 6))
    # torch -> ours: the moments and the step count carry over (bias correction continues at 4)
    ours_resumed = _ours(kind, [p.detach().clone().requires_grad_() for p in ours.param_groups[0]["params"]])
    ref_copy = _torch(kind, _params())
    _steps(ref_copy, range(3))
    ours_resumed.load_state_dict(copy.deepcopy(ref_copy.state_dict()))  # as from a file
    resumed = [ours_resumed]
    if kind != "cpu_adagrad":  # torch's Adagrad needs its own group keys (lr_decay) in a state dict
        # ours -> torch
        torch_resumed = _torch(kind, [p.detach().clone().requires_grad_() for p in ours.param_groups[0]["params"]])
        torch_resumed.load_state_dict(copy.deepcopy(ours.state_dict()))
        resumed.append(torch_resumed)
    for got in [_steps(opt, range(3, 6)) for opt in resumed]:
        for g, w in zip(got, uninterrupted):
            torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


def test_fused_adam_state_counted_per_group_still_loads():
    """A FusedAdam checkpoint from before per-parameter steps (count in param_groups) resumes."""
    opt = FusedAdam(_params(), adam_w_mode=True, **HYPER)
    _steps(opt, range(3))
    state = copy.deepcopy(opt.state_dict())  # as from a file: no tensor shared with opt
    for entry in state["state"].values():
        del entry["step"]
    state["param_groups"][0]["step"] = 3
    again = FusedAdam([p.detach().clone().requires_grad_() for p in opt.param_groups[0]["params"]],
                      adam_w_mode=True, **HYPER)
    again.load_state_dict(state)
    for g, w in zip(_steps(again, range(3, 5)), _steps(opt, range(3, 5))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_fused_adam_load_keeps_fp32_moments_of_bf16_parameters():
    params = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    opt = FusedAdam(params, **HYPER)
    _steps(opt, range(2))
    again = FusedAdam([torch.nn.Parameter(p.detach().clone()) for p in params], **HYPER)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(params, again.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert again.state[q][key].dtype == torch.float32
            torch.testing.assert_close(again.state[q][key], opt.state[p][key], rtol=0, atol=0)
