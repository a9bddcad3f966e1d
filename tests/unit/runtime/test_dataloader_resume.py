"""Exact resume through the engine-built data loader: the loader's position is checkpointed."""
import pytest
import torch

from dist_harness import run_distributed
from engine_test_models import IN_DIM, OUT_DIM, base_config, make_model

MICRO_BS = 2
NUM_SAMPLES = 40  # 10 batches per rank and epoch at 2 ranks
TOTAL_STEPS = 14
SAVE_AT = 6  # mid-epoch; the continuation crosses into the next epoch


def _dataset():
    gen = torch.Generator().manual_seed(4321)
    return torch.utils.data.TensorDataset(torch.randn(NUM_SAMPLES, IN_DIM, generator=gen),
                                          torch.randn(NUM_SAMPLES, OUT_DIM, generator=gen))


def _engine(world_size, stage, seed=1234):
    import deepscale
    config = base_config(MICRO_BS, 1, world_size, zero_optimization={"stage": stage},
                         scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}})
    return deepscale.initialize(model=make_model(seed=seed, dropout=0.1), config=config, training_data=_dataset())[0]


def _forever(loader):
    while True:
        yield from loader


def _train(engine, steps):
    losses, batches = [], _forever(engine.training_dataloader)
    for _ in range(steps):
        x, y = next(batches)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _resume_run(world_size, stage, ckpt_dir):
    full = _engine(world_size, stage)
    uninterrupted = _train(full, TOTAL_STEPS)
    full.destroy()
    first = _engine(world_size, stage)
    _train(first, SAVE_AT)
    first.save_checkpoint(ckpt_dir, client_state={"mine": 1})
    first.destroy()
    resumed = _engine(world_size, stage, seed=99)
    _, client = resumed.load_checkpoint(ckpt_dir)
    position = resumed.training_dataloader.state_dict()
    after = _train(resumed, TOTAL_STEPS - SAVE_AT)
    return uninterrupted[SAVE_AT:], after, client, position


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_through_engine_loader_is_bitwise(tmp_path, stage):
    for want, got, client, position in run_distributed(_resume_run, 2, args=(2, stage, str(tmp_path))):
        assert got == want  # fp32, bit-identical, across the epoch boundary
        assert client == {"mine": 1}  # the loader's reserved key is not handed back
        assert (position["epoch"], position["batches_yielded"]) == (0, SAVE_AT)


def test_loader_position_round_trip_without_engine():
    from deepscale.runtime.dataloader import DeepScaleDataLoader
    data = _dataset()
    reference = DeepScaleDataLoader(data, batch_size=3, seed=5)
    full = [b[0] for b in reference] + [b[0] for b in reference]  # two epochs
    loader = DeepScaleDataLoader(data, batch_size=3, seed=5)
    seen = []
    for i, batch in enumerate(loader):
        seen.append(batch[0])
        if i == 4:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (0, 5)
    resumed = DeepScaleDataLoader(data, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batches_yielded"] == 5  # saving again before iterating keeps the position
    seen += [b[0] for b in resumed] + [b[0] for b in resumed]
    assert len(seen) == len(full) and all(torch.equal(a, b) for a, b in zip(seen, full))


def test_finished_epoch_resumes_at_the_next_one_and_global_rng_is_untouched():
    from deepscale.runtime.dataloader import DeepScaleDataLoader
    data = _dataset()
    loader = DeepScaleDataLoader(data, batch_size=4, seed=1)
    torch.manual_seed(0)
    first_epoch = [b[0] for b in loader]
    assert torch.equal(torch.rand(3), torch.manual_seed(0) and torch.rand(3))  # iterating drew no global RNG
    second = DeepScaleDataLoader(data, batch_size=4, seed=1)
    second.load_state_dict(loader.state_dict())
    expected = DeepScaleDataLoader(data, batch_size=4, seed=1)
    expected.set_epoch(1)
    got, want = [b[0] for b in second], [b[0] for b in expected]
    assert len(first_epoch) == len(got) == 10
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[0], first_epoch[0])  # a new shuffle, not the old epoch again


def test_position_converts_to_another_data_parallel_size():
    from deepscale.runtime.dataloader import DeepScaleDataLoader
    loader = DeepScaleDataLoader(_dataset(), batch_size=2, dp_rank=0, dp_world_size=1)
    loader.load_state_dict({"epoch": 0, "batches_yielded": 4, "batch_size": 2, "dp_world_size": 2, "seed": 0})
    assert loader.state_dict()["batches_yielded"] == 8  # 16 samples consumed globally
    assert len(list(loader)) == 20 - 8


class _WorkerSeed(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.initial_seed()  # the worker's seed: what random augmentations draw from


def _worker_seeds(rank, epoch):
    from deepscale.runtime.dataloader import DeepScaleDataLoader
    loader = DeepScaleDataLoader(_WorkerSeed(), batch_size=1, dp_rank=rank, dp_world_size=2, num_workers=1)
    loader.set_epoch(epoch)
    return {int(batch) for batch in loader}


def test_worker_seeds_are_reproducible_and_differ_by_rank_and_epoch():
    assert _worker_seeds(0, 0) == _worker_seeds(0, 0)
    assert _worker_seeds(0, 0) != _worker_seeds(1, 0)
    assert _worker_seeds(0, 0) != _worker_seeds(0, 1)
