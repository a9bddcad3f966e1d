"""Checkpoints of tensor-parallel engines hold whole weights: saved at TP=2 they load at TP=1, TP=2 and
TP=4 with the same next-step loss (fp32, rtol 1e-5), and zero_to_fp32 returns the unsharded state dict."""
import pytest
import torch

from dist_harness import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def _config(tp, momentum):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": momentum}}}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    return cfg


def _engine(tp, momentum):
    import deepscale
    from deepscale.parallel import reset_parallel_grid
    from _tp_models import build_example_gpt
    reset_parallel_grid()
    engine, *_ = deepscale.initialize(model=build_example_gpt(), config=_config(tp, momentum))
    return engine


def _step(engine, ids):
    loss = engine((ids, ids))
    engine.backward(loss)
    engine.step()
    return loss.item()


def _save_body(path, momentum):
    from _tp_models import batches
    from deepscale.parallel.state_dict import full_state_dict
    engine = _engine(2, momentum)
    data = batches(4, 2, 8)
    for ids in data[:3]:
        _step(engine, ids)
    engine.save_checkpoint(path, tag="t3")
    whole = full_state_dict(engine.module)
    next_loss = _step(engine, data[3])
    after = _step(engine, data[3])
    engine.destroy()
    return next_loss, after, whole


def _load_body(path, tp, momentum):
    from _tp_models import batches
    engine = _engine(tp, momentum)
    engine.load_checkpoint(path, tag="t3")
    data = batches(4, 2, 8)
    next_loss = _step(engine, data[3])
    after = _step(engine, data[3])
    engine.destroy()
    return next_loss, after


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tp2_checkpoint_loads_at_other_degrees(tmp_path, momentum):
    path = str(tmp_path / "ckpt")
    (next_loss, after, whole), _ = run_distributed(_save_body, 2, args=(path, momentum))
    # Same degree: weights and optimizer state (momentum) come back, so two more steps match.
    same = run_distributed(_load_body, 2, args=(path, 2, momentum))[0]
    assert same == pytest.approx((next_loss, after), rel=RTOL)
    if momentum == 0.0:  # other degrees reshard the weights; SGD without momentum has no state to lose
        for world in (1, 4):
            moved = run_distributed(_load_body, world, args=(path, world, momentum))[0]
            assert moved == pytest.approx((next_loss, after), rel=RTOL), world
        from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        fp32 = get_fp32_state_dict_from_zero_checkpoint(path, tag="t3")
        assert set(fp32) == set(whole)
        for key, value in whole.items():
            assert fp32[key].shape == value.shape and torch.allclose(fp32[key], value, rtol=RTOL, atol=ATOL), key
