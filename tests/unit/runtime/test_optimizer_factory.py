"""Optimizer factory: names, Adam flavours, Lion numerics, error messages."""
import pytest
import torch

from deepscale.runtime.optim import Lion, build_optimizer, compiled
from deepscale.runtime.optim.factory import UNAVAILABLE_OPTIMIZER_NAMES, VALID_OPTIMIZER_NAMES


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


@pytest.fixture
def torch_only(monkeypatch):
    """The compiled optimizers' ops count as unavailable: the factory builds torch's optimizers.

    (Which implementation is chosen, and when, is tested in test_compiled_optimizer_choice.py.)
    """
    monkeypatch.setattr(compiled, "load_op", lambda name, **kwargs: None)


@pytest.mark.parametrize("name, params, cls", [
    ("adam", {}, torch.optim.AdamW),  # DeepSpeed: adam_w_mode defaults to True
    ("Adam", {"adam_w_mode": False}, torch.optim.Adam),
    ("ADAMW", {"adam_w_mode": False}, torch.optim.AdamW),  # the adamw name always decouples
    ("adam", {"torch_adam": True, "adam_w_mode": False}, torch.optim.Adam),
    ("sgd", {"lr": 0.1, "momentum": 0.9}, torch.optim.SGD),
    ("Adagrad", {"lr": 0.1}, torch.optim.Adagrad),
    ("lion", {"lr": 1e-4}, Lion),
    ("RMSprop", {"lr": 0.01}, torch.optim.RMSprop),  # torch.optim fallback by exact class name
])
def test_builds_each_name(name, params, cls, torch_only):
    model = _model()
    opt = build_optimizer(name, params, model.parameters())  # a generator is fine
    assert type(opt) is cls
    assert sum(len(g["params"]) for g in opt.param_groups) == 2


def test_adam_defaults_follow_deepspeed():
    opt = build_optimizer("adam", {"lr": 0.01}, _model().parameters())
    assert opt.defaults["weight_decay"] == 0.0  # FusedAdam's default, not torch AdamW's 0.01
    assert opt.defaults["lr"] == 0.01
    torch_opt = build_optimizer("adam", {"torch_adam": True}, _model().parameters())
    assert torch_opt.defaults["weight_decay"] == 0.01  # torch_adam keeps torch's defaults


def test_adam_uses_fused_kernel_on_cpu_unless_told_otherwise(torch_only):
    assert build_optimizer("adamw", {}, _model().parameters()).defaults["fused"] is True
    explicit = build_optimizer("adamw", {"foreach": True}, _model().parameters())
    assert explicit.defaults["fused"] is None and explicit.defaults["foreach"] is True


@pytest.mark.parametrize("adam_w_mode, expected", [(True, 4.0 * (1 - 0.1 * 0.5)), (False, 4.0 - 0.1)])
def test_adam_w_mode_decouples_weight_decay(adam_w_mode, expected):
    # p = 4, grad = 0, lr = 0.1, wd = 0.5. Decoupled: p * (1 - lr * wd) = 3.8 (the Adam
    # update of a zero gradient is 0). Coupled (L2): grad becomes wd * p = 2, and the first
    # bias-corrected Adam step moves p by lr * 2 / |2| = 0.1.
    p = torch.nn.Parameter(torch.tensor([4.0]))
    opt = build_optimizer("adam", {"lr": 0.1, "weight_decay": 0.5, "adam_w_mode": adam_w_mode}, [p])
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p.item() == pytest.approx(expected, rel=1e-6)


def test_param_group_dicts():
    model = _model()
    groups = [{"params": [model.weight], "lr": 0.5}, {"params": [model.bias], "weight_decay": 0.0}]
    opt = build_optimizer("adamw", {"lr": 0.1, "weight_decay": 0.2}, groups)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


def _lion_reference(p, grads, lr, beta1, beta2, wd):
    m = 0.0
    for g in grads:
        update = 1.0 if beta1 * m + (1 - beta1) * g > 0 else -1.0
        p = p * (1 - lr * wd) - lr * update
        m = beta2 * m + (1 - beta2) * g
    return p, m


@pytest.mark.parametrize("foreach", [True, False])
def test_lion_matches_hand_computation(foreach):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer("lion", {"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.5, "foreach": foreach}, [p])
    grads = [[0.5, -0.1], [0.5, 0.4], [-0.01, 0.2]]
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    for i in range(2):
        want_p, want_m = _lion_reference([1.0, -2.0][i], [g[i] for g in grads], 0.1, 0.9, 0.99, 0.5)
        assert p[i].item() == pytest.approx(want_p, rel=1e-6)
        assert opt.state[p]["exp_avg"][i].item() == pytest.approx(want_m, rel=1e-6)
    # Coordinate 0 by hand: m = 0.005, then 0.00995. Step 3's gradient is negative, but
    # 0.9 * 0.00995 + 0.1 * -0.01 = 0.007955 > 0, so the momentum keeps the update at +1:
    # p = 1 -> 1 * 0.95 - 0.1 = 0.85 -> 0.7075 -> 0.7075 * 0.95 - 0.1 = 0.572125.
    assert p[0].item() == pytest.approx(0.572125, rel=1e-6)


def test_lion_defaults_and_validation():
    opt = Lion([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="betas"):
        Lion([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.5))


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as err:
        build_optimizer("adamx", {}, _model().parameters())
    message = str(err.value)
    assert "optimizer.type 'adamx' is not a known optimizer" in message
    assert ", ".join(VALID_OPTIMIZER_NAMES) in message


@pytest.mark.parametrize("name", ["OneBitAdam", "lamb", "zerooneadam", "onebitlamb", "muadam"])
def test_deepspeed_only_names_are_reported_unavailable(name):
    assert name.lower() in UNAVAILABLE_OPTIMIZER_NAMES
    with pytest.raises(ValueError, match=f"'{name}' is a DeepSpeed optimizer that deepscale does not provide yet"):
        build_optimizer(name, {}, _model().parameters())


@pytest.mark.parametrize("name, params, pattern", [
    ("adam", {"beta": 0.9}, r"optimizer.params.beta is not accepted by optimizer 'adam'; accepted keys: lr, betas"),
    ("sgd", {"betas": (0.9, 0.99)}, r"optimizer.params.betas is not accepted by optimizer 'sgd'; accepted keys: lr, "
     r"momentum"),
    ("lion", {"eps": 1e-8}, r"optimizer.params.eps is not accepted by optimizer 'lion'; accepted keys: lr, betas, "
     r"weight_decay, foreach"),
    ("adam", {"max_grad_norm": 1.0}, r"optimizer.params.max_grad_norm .*gradient_clipping"),
    ("adam", {"bias_correction": False}, r"optimizer.params.bias_correction"),
    ("adam", {"adam_w_mode": "yes"}, r"optimizer.params.adam_w_mode must be true or false"),
])
def test_bad_param_keys(name, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_optimizer(name, params, _model().parameters())


def test_fused_adam_only_keys_accepted(torch_only):
    opt = build_optimizer("adam", {"bias_correction": True, "set_grad_none": True}, _model().parameters())
    assert isinstance(opt, torch.optim.AdamW)


def test_bad_model_parameters_type():
    with pytest.raises(TypeError, match="model_parameters"):
        build_optimizer("sgd", {}, torch.zeros(2))
