"""Per-rank model-state bytes of the live buffers match the ZeRO paper's formulas.

bf16 model with bf16 gradient accumulation and AdamW, i.e. the paper's mixed-precision Adam:
Psi parameters, N ranks; stage 1: 4Psi + 12Psi/N bytes, stage 2: 2Psi + 14Psi/N
(Rajbhandari et al. 2020). The only allowed excess is the padding of each bucket to a multiple
of N * align elements.
"""
import pytest

from dist_harness import run_distributed
from _zero_test_helpers import build_engine, train


def _measure(stage, world):
    from deepscale.runtime.zero.memory import live_model_state_bytes
    from deepscale.runtime.zero.partition import padding_elements
    engine = build_engine(stage, world, extra_cfg={"bf16": {"enabled": True},
                                                   "data_types": {"grad_accum_dtype": "bf16"}})
    opt = engine._train_opt
    staging_peak = [0]

    def watch(_param):  # runs after the optimizer's own hook: sum the staging buffers alive now
        live = sum(b.staging.numel() for b in opt.buckets if b.staging is not None and stage == 2)
        staging_peak[0] = max(staging_peak[0], live)
    handles = [p.register_post_accumulate_grad_hook(watch) for p in engine.module.parameters() if p.requires_grad]
    train(engine, world, range(2))
    for handle in handles:
        handle.remove()
    num_params = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    grads_left = [n for n, p in engine.module.named_parameters() if p.grad is not None]
    return (live_model_state_bytes(opt), num_params, padding_elements([b.plan for b in opt.buckets]),
            staging_peak[0], grads_left)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_live_model_states_match_paper_formula(stage, world):
    for live, psi, pad, staging_peak, grads_left in run_distributed(_measure, world, args=(stage, world)):
        n = world
        partitioned = live["master"] + live["optimizer_states"] + (live["gradients"] if stage == 2 else 0)
        per_elem = 12 if stage == 1 else 14  # fp32 master + Adam m, v (+ bf16 gradient chunk)
        assert per_elem * psi / n <= partitioned <= per_elem * (psi + pad) / n
        assert live["master"] == 4 * (psi + pad) // n and live["optimizer_states"] == 8 * (psi + pad) // n
        replicated = live["params"] + (live["gradients"] if stage == 1 else 0)
        assert replicated == (2 if stage == 2 else 4) * (psi + pad)
        paper = 4 * psi + 12 * psi / n if stage == 1 else 2 * psi + 14 * psi / n
        total = partitioned + replicated
        assert paper <= total <= paper + 16 * pad
        assert grads_left == []  # gradients live only in the optimizer's buffers
        if stage == 2:
            # No rank ever holds the full gradient: at most a few buckets are staged at once.
            assert 0 < staging_peak < psi


def test_paper_formula_and_estimator():
    from deepscale.runtime.zero import (estimate_zero2_model_states_mem_needs,
                                        estimate_zero2_model_states_mem_needs_all_live, zero_model_state_bytes)
    psi = 1_000_000
    assert zero_model_state_bytes(psi, 0, 4) == 16 * psi
    assert zero_model_state_bytes(psi, 1, 4) == 4 * psi + 3 * psi
    assert zero_model_state_bytes(psi, 2, 4) == 2 * psi + 3.5 * psi
    assert zero_model_state_bytes(psi, 3, 4) == 4 * psi
    est = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=2, num_nodes=2)
    assert est == {"device_bytes": 5.5 * psi, "host_bytes_per_node": 0.0}
    import torch
    rows = estimate_zero2_model_states_mem_needs_all_live(torch.nn.Linear(1000, 1000), num_gpus_per_node=4)
    assert [r["offload_optimizer"] for r in rows] == ["cpu", "none"]
    assert rows[1]["device_bytes"] == zero_model_state_bytes(1_001_000, 2, 4)
    with pytest.raises(ValueError, match="stage must be"):
        zero_model_state_bytes(psi, 4, 2)
