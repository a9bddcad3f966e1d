"""The parts of ZeRO-3 parameter offload that need no process group: the read-ahead plan, swap
files, the NVMe shard store, settings and their errors."""
import errno
import os

import pytest
import torch

from deepscale.runtime.offload.param_offload import ParamOffloadSettings
from deepscale.runtime.offload.param_prefetch_plan import plan_swap_ins, simulate
from deepscale.runtime.offload.param_stores import NvmeShardStore, host_buffer
from deepscale.runtime.offload.param_swap_file import SWAP_DIR_NAME, ParamSwapDirectory, padded_nbytes

BLOCK = 4096
AIO = dict(block_size=BLOCK, queue_depth=4, thread_count=1, backend="python")


# --- the plan -------------------------------------------------------------------------------
def test_plan_keeps_buffer_count_reads_ahead():
    plan = plan_swap_ins([0, 1, 2, 3, 4], buffer_count=2)
    assert plan.issue == ((0, 1), (2,), (3,), (4,), (), ())
    sim = simulate(plan, {g: 100 for g in range(5)})
    assert sim == {"reads": 5, "bytes_read": 500, "peak_buffers": 2, "ready_uses": 5, "uses": 5}


def test_plan_reads_a_repeated_group_once_per_use_never_twice_at_once():
    # group 1 is used at positions 1 and 2 (a module called twice): its second read waits for the first use
    plan = plan_swap_ins([0, 1, 1, 2], buffer_count=3)
    assert plan.issue[0] == (0, 1)
    assert plan.issue[2] == (1, 2)  # after consuming the first use of group 1
    sim = simulate(plan, {0: 1, 1: 1, 2: 1})
    assert sim["ready_uses"] == 4 and sim["reads"] == 4 and sim["peak_buffers"] <= 3


@pytest.mark.parametrize("buffer_count", [1, 2, 5])
def test_every_use_is_read_before_it_and_buffers_are_bounded(buffer_count):
    order = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    sim = simulate(plan_swap_ins(order, buffer_count), {g: 8 for g in set(order)})
    assert sim["ready_uses"] == len(order) and sim["reads"] == len(order)
    assert sim["peak_buffers"] <= buffer_count


def test_plan_describe_and_bad_buffer_count():
    assert "consume group 7" in plan_swap_ins([7], 1).describe()
    with pytest.raises(ValueError, match="buffer_count"):
        plan_swap_ins([1], 0)


# --- swap files ------------------------------------------------------------------------------
def test_padding_and_directory_lifecycle(tmp_path):
    assert padded_nbytes(1, BLOCK) == BLOCK and padded_nbytes(BLOCK + 1, BLOCK) == 2 * BLOCK
    stale = tmp_path / SWAP_DIR_NAME / "rank3"
    stale.mkdir(parents=True)
    (stale / "group0.swp").write_bytes(b"left by a crashed run")
    directory = ParamSwapDirectory(str(tmp_path), rank=3, block_size=BLOCK)
    assert os.listdir(directory.path) == []  # the stale file was removed at start
    directory.close()
    assert not os.path.exists(directory.path)


def test_nvme_path_errors(tmp_path):
    with pytest.raises(ValueError, match="nvme_path"):
        ParamSwapDirectory("", 0, BLOCK)
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        ParamSwapDirectory(str(afile), 0, BLOCK)


def _store(tmp_path, debug=False, buffer_count=2, slot_numel=2048):
    directory = ParamSwapDirectory(str(tmp_path), 0, BLOCK, debug=debug)
    return NvmeShardStore(directory, buffer_count, slot_numel, torch.float32, pin=False, aio=AIO)


def test_store_round_trip_pads_files_and_reads_ahead(tmp_path):
    store = _store(tmp_path)
    shards = {k: torch.randn(300 + k) for k in range(4)}
    for key, value in shards.items():
        store.put(key, value)
    assert store.flush() is None
    for key, value in shards.items():
        assert os.path.getsize(store.dir.file_for(key)) == BLOCK  # 1.2 KB padded to one block
    assert store.start_read(2) and store.start_read(3) and not store.start_read(0)  # two buffers
    for key in (2, 3, 0, 1):
        out = torch.empty_like(shards[key])
        store.load(key, out)
        torch.testing.assert_close(out, shards[key], rtol=0, atol=0)
    assert (store.loads_read_ahead, store.loads_on_demand) == (2, 2)
    store.close()
    assert not os.path.exists(store.dir.path)


def test_short_file_is_an_error_naming_sizes(tmp_path):
    store = _store(tmp_path)
    store.put(0, torch.ones(100))
    store.flush()
    with open(store.dir.file_for(0), "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match=r"short: 100 bytes on disk, 4096 written \(logical size 400\)"):
        store.load(0, torch.empty(100))
    store.close()


def test_debug_mode_verifies_what_was_read(tmp_path):
    store = _store(tmp_path, debug=True)
    store.put(0, torch.arange(100, dtype=torch.float32))
    store.flush()
    with open(store.dir.file_for(0), "r+b") as f:
        f.seek(8)
        f.write(b"\x00\x00\x80\x7f")  # flip element 2
    with pytest.raises(RuntimeError, match="differ from those written"):
        store.load(0, torch.empty(100))
    store.close()


def test_failed_write_is_reported_by_flush(tmp_path, monkeypatch):
    store = _store(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "x")

    monkeypatch.setattr(store.slots[0].handle, "async_pwrite", full_disk)
    monkeypatch.setattr(store.slots[1].handle, "async_pwrite", full_disk)
    store.put(0, torch.ones(10))
    assert "No space left on device" in store.flush()
    assert store.flush() is None
    store.close()


# --- settings -------------------------------------------------------------------------------
def test_settings_errors_name_the_key():
    with pytest.raises(ValueError, match="offload_param.nvme_path"):
        ParamOffloadSettings(device="nvme")
    with pytest.raises(ValueError, match="offload_param.buffer_count must be at least 1"):
        ParamOffloadSettings(device="nvme", nvme_path="/x", buffer_count=0)
    with pytest.raises(ValueError, match="offload_param.device"):
        ParamOffloadSettings(device="disk")
    assert ParamOffloadSettings(device="nvme", nvme_path="/x", buffer_size=10).max_group_numel(4) == 40
    assert ParamOffloadSettings(device="cpu").max_group_numel(4) is None


def test_pinning_that_cannot_be_had_warns_once(monkeypatch):
    import deepscale.runtime.offload.param_stores as stores
    messages = []
    monkeypatch.setattr(stores, "_mlock", lambda tensor: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(stores, "warning_once", lambda msg, _seen=set(): (msg in _seen) or (
        _seen.add(msg), messages.append(msg)))
    for _ in range(3):
        buf = host_buffer(1000, torch.float32, pin=True, what="parameter shards")
        assert buf.numel() == 1000 and buf.data_ptr() % 4096 == 0
    assert len(messages) == 1 and "pageable" in messages[0] and "pin_memory" in messages[0]


# --- the executor on one rank: read-ahead on and off its plan, writes ---------------------------
def _offloaded_groups(tmp_path, num_groups=4, numel=300, buffer_count=2):
    from deepscale.runtime.offload.param_offload import ParamOffload
    from deepscale.runtime.zero.stage3.collectives import CollectiveRunner
    from deepscale.runtime.zero.stage3.param_group import ParamGroup
    from deepscale.runtime.zero.stage3.zero_param import partition_param
    torch.manual_seed(0)
    values = [torch.randn(numel) for _ in range(num_groups)]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    for param in params:
        partition_param(param, None, 1, 0)
    runner = CollectiveRunner(None, 1)
    groups = [ParamGroup(i, [p], [f"p{i}"], [f"m{i}"], runner) for i, p in enumerate(params)]
    settings = ParamOffloadSettings(device="nvme", nvme_path=str(tmp_path), buffer_count=buffer_count,
                                    buffer_size=1000, max_in_cpu=0, aio=AIO)
    return ParamOffload(settings, groups, None, 1), groups, values


def _pass(offload, groups, values, order):
    offload.begin_phase("forward")
    for index in order:
        group = groups[index]
        group.finish_gather()
        torch.testing.assert_close(group.params[0].data, values[index], rtol=0, atol=0)
        group.release()
        assert not offload._buffers[index].resident  # the shard left the module's storage again
    offload.end_phase()


def test_read_ahead_follows_the_recorded_order_and_recovers_from_another(tmp_path):
    offload, groups, values = _offloaded_groups(tmp_path)
    nvme = offload.nvme
    _pass(offload, groups, values, [0, 1, 2, 3])  # recorded: all on demand
    assert (nvme.loads_read_ahead, nvme.loads_on_demand) == (0, 4)
    _pass(offload, groups, values, [0, 1, 2, 3])
    assert (nvme.loads_read_ahead, nvme.loads_on_demand) == (4, 4)
    assert offload.plan("forward").order == (0, 1, 2, 3)
    _pass(offload, groups, values, [3, 2, 1, 0])  # another path: correct values, read on demand after the miss
    assert nvme.loads_on_demand > 4
    _pass(offload, groups, values, [3, 2, 1, 0])  # the new order was recorded
    assert offload.plan("forward").order == (3, 2, 1, 0)
    before = nvme.loads_read_ahead
    _pass(offload, groups, values, [3, 2, 1, 0])
    assert nvme.loads_read_ahead == before + 4
    offload.close()


def test_writes_through_open_for_write_are_stored_with_few_groups_loaded(tmp_path):
    offload, groups, values = _offloaded_groups(tmp_path, num_groups=5, buffer_count=2)
    for index, group in enumerate(groups):  # piece by piece, as the optimizer's slab walk does
        offload.open_for_write(group)
        assert len(offload._resident) <= 2
        group.params[0].ds_tensor[:10].fill_(float(index))
        values[index][:10] = float(index)
    offload.close_writes()
    assert not offload._resident
    _pass(offload, groups, values, range(5))
    offload.close()
