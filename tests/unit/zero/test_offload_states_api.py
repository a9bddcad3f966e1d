"""engine.offload_states() / reload_states(): argument checks, and training goes on unchanged.

Only the CPU exists on the test machine, so nothing is on a device to move: these tests pin the
API (DeepSpeed's names and arguments, the bytes moved per type) and that an offload/reload
round trip between steps leaves training identical. The device->host move itself runs on GPUs only.
"""
import pytest
import torch

from dist_harness import run_distributed
from _offload_helpers import offload_kwargs
from _zero_test_helpers import build_engine, module_params, train


def _run(stage, offload, round_trip):
    engine = build_engine(stage, 2, **offload_kwargs(offload, ""))
    losses = train(engine, 2, range(2))
    moved = None
    if round_trip:
        moved = engine.offload_states()
        with pytest.raises(RuntimeError, match="already offloaded"):
            engine.offload_states(include=["optim_states"])
        engine.reload_states()
        with pytest.raises(ValueError, match="unknown state type"):
            engine.offload_states(include=["activations"])
        with pytest.raises(ValueError, match="only 'cpu'"):
            engine.offload_states(device="nvme")
    losses += train(engine, 2, range(2, 4))
    params = module_params(engine)
    engine.destroy()
    return losses, params, moved


@pytest.mark.parametrize("stage,offload", [(1, "none"), (2, "cpu"), (3, "none"), (3, "cpu")])
def test_round_trip_keeps_training_unchanged(stage, offload):
    plain = run_distributed(_run, 2, args=(stage, offload, False))[0]
    tripped = run_distributed(_run, 2, args=(stage, offload, True))[0]
    assert tripped[0] == plain[0]
    for name, value in plain[1].items():
        assert torch.equal(tripped[1][name], value)
    assert set(tripped[2]) == {"optim_states", "hp_params", "lp_params", "lp_grads", "contiguous_grad_buffer"}
    assert all(v == 0 for v in tripped[2].values())  # everything already lives on the host here
