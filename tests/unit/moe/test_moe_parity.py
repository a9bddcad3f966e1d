"""Expert parallelism x ZeRO on 4 gloo ranks against a single process running all experts.

Every configuration trains the same model (4 experts, top-2, dense layers around the MoE layer)
over the same per-rank batches; the reference runs each rank's batch through one process holding
all experts and averages the losses. fp32, SGD: losses and weights agree to 1e-6 relative.
"""
import pytest
import torch

from dist_harness import run_distributed
from moe._moe_models import NUM_EXPERTS, build_engine, reference_run

NUM_STEPS = 3
WORLD = 4


def _global_name(name, ep_size, ep_rank):
    marker = "deepspeed_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    index, rest = tail.split(".", 1)
    return f"{head}{marker}{int(index) + ep_rank * (NUM_EXPERTS // ep_size)}.{rest}"


def _max_rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _parity_body(ep_sizes, stages, model_kwargs):
    import torch.distributed as dist
    from deepscale.utils import safe_get_full_fp32_param
    rank = dist.get_rank()
    ref_losses, ref_params = reference_run(NUM_STEPS, WORLD, **model_kwargs)
    errors = {}
    for ep_size in ep_sizes:
        for stage in stages:
            engine = build_engine(stage, ep_size, **model_kwargs)
            from moe._moe_models import batch
            loss_err = 0.0
            for step in range(NUM_STEPS):
                loss = engine(*batch(step, rank))
                engine.backward(loss)
                engine.step()
                want = ref_losses[step][rank]
                loss_err = max(loss_err, abs(float(loss) - want) / abs(want))
            param_err = 0.0
            for name, param in engine.module.named_parameters():
                full = safe_get_full_fp32_param(param) if stage == 3 else param.detach().float()
                want = ref_params[_global_name(name, ep_size, rank % ep_size)]
                param_err = max(param_err, _max_rel(full.reshape(want.shape), want))
            errors[(ep_size, stage)] = (loss_err, param_err)
            engine.destroy()
    return errors


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
def test_ep_x_zero_parity_against_single_process(drop_tokens):
    kwargs = dict(k=2, drop_tokens=drop_tokens, capacity_factor=8.0)
    results = run_distributed(_parity_body, WORLD, args=((1, 2, 4), (0, 1, 2, 3), kwargs), timeout=240)
    for rank, errors in enumerate(results):
        for (ep_size, stage), (loss_err, param_err) in errors.items():
            assert loss_err < 1e-6, f"rank {rank} EP={ep_size} ZeRO-{stage}: loss relative error {loss_err:.2e}"
            assert param_err < 1e-6, f"rank {rank} EP={ep_size} ZeRO-{stage}: weight relative error {param_err:.2e}"


def _half_body(stage, dtype):
    import torch.distributed as dist
    from moe._moe_models import batch, build_engine
    rank = dist.get_rank()
    ref_losses, _ = reference_run(NUM_STEPS, WORLD)
    # fp16: a small initial loss scale, so no step is skipped for overflow (the reference skips none)
    section = {"enabled": True, **({"initial_scale_power": 8} if dtype == "fp16" else {})}
    engine = build_engine(stage, 2, extra_config={dtype: section})
    errs = []
    for step in range(NUM_STEPS):
        loss = engine(*batch(step, rank))
        engine.backward(loss)
        engine.step()
        errs.append(abs(loss.item() - ref_losses[step][rank]) / abs(ref_losses[step][rank]))
    engine.destroy()
    return max(errs)


@pytest.mark.parametrize("stage, dtype", [(2, "bf16"), (3, "bf16"), (2, "fp16")])
def test_half_precision_ep2_tracks_the_fp32_reference(stage, dtype):
    errors = run_distributed(_half_body, WORLD, args=(stage, dtype), timeout=180)
    # bf16 keeps 8 bits of mantissa, fp16 11 (with dynamic loss scaling)
    assert max(errors) < (2e-2 if dtype == "bf16" else 3e-3), errors


def _gas_body(stages):
    import torch.distributed as dist
    from moe._moe_models import MICRO_BS, MoENet, batch, build_engine, reference_state
    rank = dist.get_rank()
    # reference: each optimizer step averages 2 micro-batches on each of the 4 ranks
    model = MoENet()
    model.load_state_dict(reference_state())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = []
    for step in range(2):
        losses = [model(*batch(10 * step + m, r)) for r in range(WORLD) for m in range(2)]
        opt.zero_grad()
        (sum(losses) / len(losses)).backward()
        opt.step()
        ref.append(float(sum(losses) / len(losses)))
    out = {}
    for stage in stages:
        engine = build_engine(stage, 2, extra_config={"train_batch_size": MICRO_BS * WORLD * 2,
                                                      "gradient_accumulation_steps": 2})
        mine = []
        for step in range(2):
            total = 0.0
            for m in range(2):
                loss = engine(*batch(10 * step + m, rank))
                engine.backward(loss)
                engine.step()
                total += loss.item() / 2
            summed = torch.tensor([total])
            dist.all_reduce(summed)
            mine.append(float(summed) / WORLD)
        out[stage] = max(abs(a - b) / abs(b) for a, b in zip(mine, ref))
        engine.destroy()
    return out


def test_gradient_accumulation_ep2():
    for errors in run_distributed(_gas_body, WORLD, args=((0, 1, 2, 3),), timeout=240):
        for stage, err in errors.items():
            assert err < 1e-6, (stage, err)
