"""3D checkpoints are independent of the parallel layout: saved at TP=2 x PP=2 x DP=2 (ZeRO-1), they
load into the dense layers at TP=1 without pipelining (a plain engine) and at TP=1 x PP=2, with the
same next-step loss (fp32, rtol 1e-5); at the same layout the optimizer state (momentum) comes back
too; ``zero_to_fp32`` returns the whole, unsharded weights."""
import torch

from dist_harness import run_distributed
from _3d_models import ATOL, DP, GAS, PP, RTOL, TP

SAVED_STEPS = 2


def _save_body(path):
    from _3d_models import build_3d_engine
    from deepscale.parallel.state_dict import full_state_dict
    engine = build_3d_engine(zero_stage=1, use_mpu=False)
    _train_steps(engine, start=0, count=SAVED_STEPS)
    engine.save_checkpoint(path, tag="3d")
    saved = full_state_dict(engine.module)
    next_loss, after = _train_steps(engine)
    return next_loss, saved, after


def _train_steps(engine, start=SAVED_STEPS, count=2):
    from _3d_models import rank_iterator
    feeds = engine.is_first_stage() or engine.is_last_stage()
    return [float(engine.train_batch(rank_iterator(step, engine.grid.data_parallel_id) if feeds else None))
            for step in range(start, start + count)]


def _same_layout_body(path):
    from _3d_models import build_3d_engine
    engine = build_3d_engine(zero_stage=1, use_mpu=False)
    engine.load_checkpoint(path, tag="3d")
    return _train_steps(engine)


def _plain_body(path):
    import deepscale
    from _3d_models import config, dense_reference, mse, step_batch
    from deepscale.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    model = dense_reference()
    engine, *_ = deepscale.initialize(model=model, config=config(0, False))
    loaded, _ = engine.load_checkpoint(path, tag="3d")
    assert loaded is not None
    x, y = step_batch(SAVED_STEPS)
    loss = mse(engine(x), y)
    fp32 = get_fp32_state_dict_from_zero_checkpoint(path, tag="3d")
    return float(loss), {k: v.detach().clone() for k, v in model.state_dict().items()}, fp32


def _pipe_tp1_body(path):
    import deepscale
    from _3d_models import config, layer_specs, mse, rank_iterator
    from deepscale.pipe import PipelineModule
    model = PipelineModule(layer_specs(dense=True), num_stages=PP, loss_fn=mse, partition_method="uniform")
    cfg = {**config(1, False), "gradient_accumulation_steps": GAS * DP}  # the same global batch on one replica
    engine, *_ = deepscale.initialize(model=model, config=cfg)
    engine.load_checkpoint(path, tag="3d")
    feeds = engine.is_first_stage() or engine.is_last_stage()
    return float(engine.train_batch(rank_iterator(SAVED_STEPS, 0, gas=GAS * DP) if feeds else None))


def _merged(states):
    out = {}
    for state in states:
        out.update(state)
    return out


def test_3d_checkpoint_loads_at_tp1_without_pipelining(tmp_path):
    saved = run_distributed(_save_body, TP * PP * DP, args=(str(tmp_path),))
    next_losses = {(loss, after) for loss, _, after in saved}
    assert len(next_losses) == 1, f"ranks disagree on the loss: {next_losses}"
    next_loss, after = next_losses.pop()
    whole = _merged(state for _, state, _ in saved)

    # The same layout restores the optimizer state too (per tensor rank): two more steps match,
    # the second one depending on the saved momentum.
    for losses in run_distributed(_same_layout_body, TP * PP * DP, args=(str(tmp_path),)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor([next_loss, after]), rtol=RTOL, atol=ATOL)

    (plain_loss, plain_state, fp32), = run_distributed(_plain_body, 1, args=(str(tmp_path),))
    torch.testing.assert_close(torch.tensor(plain_loss), torch.tensor(next_loss), rtol=RTOL, atol=ATOL)
    assert set(plain_state) == set(whole) == set(fp32)
    for name, value in whole.items():
        torch.testing.assert_close(plain_state[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert fp32[name].shape == value.shape, f"zero_to_fp32 {name}: {tuple(fp32[name].shape)} is a shard"
        torch.testing.assert_close(fp32[name].float(), value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    pipe_losses = run_distributed(_pipe_tp1_body, PP, args=(str(tmp_path),))
    for loss in pipe_losses:
        torch.testing.assert_close(torch.tensor(loss), torch.tensor(next_loss), rtol=RTOL, atol=ATOL)
