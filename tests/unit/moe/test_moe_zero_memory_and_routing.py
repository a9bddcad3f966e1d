"""MoE x ZeRO on 4 gloo ranks: expert optimizer states are partitioned over EP x expert-DP, and
an adversarial router (every token to one expert, idle experts and idle ranks) never hangs."""
import math

import torch

from dist_harness import run_distributed
from moe._moe_models import FFN, HIDDEN, MICRO_BS, NUM_EXPERTS, batch, build_engine

WORLD = 4
EXPERT_NUMEL = HIDDEN * FFN + FFN + FFN * HIDDEN + HIDDEN


def _expert_state_bytes(engine):
    total = 0
    for group in engine.basic_optimizer.param_groups:
        if not group.get("moe"):
            continue
        for param in group["params"]:
            for value in engine.basic_optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += value.numel() * value.element_size()
    return total


def _bytes_body(ep_sizes, stages):
    out = {}
    for ep_size in ep_sizes:
        for stage in stages:
            # one bucket per group: no padding beyond the 16-element alignment the sizes already meet
            engine = build_engine(stage, ep_size, optimizer="Adam", lr=1e-3, moe_groups=True, bucket=10**6)
            import torch.distributed as dist
            loss = engine(*batch(0, dist.get_rank()))
            engine.backward(loss)
            engine.step()
            out[(ep_size, stage)] = _expert_state_bytes(engine)
            engine.destroy()
    return out


def test_expert_optimizer_bytes_per_rank_are_one_over_ep_times_expert_dp():
    results = run_distributed(_bytes_body, WORLD, args=((1, 2, 4), (0, 1, 2, 3)), timeout=240)
    total = NUM_EXPERTS * EXPERT_NUMEL * 2 * 4  # Adam: exp_avg and exp_avg_sq in fp32
    for rank, measured in enumerate(results):
        for (ep_size, stage), nbytes in measured.items():
            if stage == 0:  # replicated over expert-DP: each rank holds its experts' states whole
                assert nbytes == total // ep_size, (rank, ep_size, stage, nbytes)
            else:
                assert nbytes == total // (ep_size * (WORLD // ep_size)), (rank, ep_size, stage, nbytes)


def _skew_router(engine, expert):
    """Constant gate input and a gate that sends every token to ``expert``."""
    module = engine.module
    from deepscale.utils import safe_set_full_fp32_param
    for param, value in ((module.inp.weight, torch.zeros(HIDDEN, HIDDEN)), (module.inp.bias, torch.ones(HIDDEN))):
        _set(engine, param, value)
    gate = torch.zeros(NUM_EXPERTS, HIDDEN)
    gate[expert] = 5.0
    _set(engine, module.moe.deepspeed_moe.gate.wg.weight, gate)
    del safe_set_full_fp32_param


def _set(engine, param, value):
    from deepscale.utils import safe_set_full_fp32_param
    if engine.zero_optimization_stage() == 0:
        with torch.no_grad():
            param.copy_(value)
    else:
        safe_set_full_fp32_param(param, value)


def _adversarial_body(ep_sizes, stages, expert):
    import torch.distributed as dist
    rank = dist.get_rank()
    finished = []
    for ep_size in ep_sizes:
        for stage in stages:
            engine = build_engine(stage, ep_size, k=1, drop_tokens=False)
            _skew_router(engine, expert)
            counts = []
            for step in range(2):
                loss = engine(*batch(step, rank))
                counts.append(engine.module.moe.deepspeed_moe.exp_counts.tolist())
                engine.backward(loss)
                engine.step()
                assert math.isfinite(float(loss))
            finished.append((ep_size, stage, counts[0]))
            engine.destroy()
    return finished


def test_all_tokens_to_one_expert_finishes_every_configuration():
    results = run_distributed(_adversarial_body, WORLD, args=((1, 2, 4), (0, 1, 2, 3), NUM_EXPERTS - 1), timeout=240)
    for rank, finished in enumerate(results):
        assert len(finished) == 12
        for ep_size, stage, counts in finished:
            assert counts == [0] * (NUM_EXPERTS - 1) + [MICRO_BS], (rank, ep_size, stage, counts)
