"""The communication logger: byte counts against an independent count of torch.distributed calls
made during real engine steps, the summary dict, op selection and reset."""
import pytest
import torch

from dist_harness import run_distributed
from deepscale.utils.comms_logging import bandwidths, bus_bandwidth_factor

from _monitor_models import TokenNet, engine_config, token_batch

# How the test counts bytes itself, per torch.distributed function: the argument whose size is
# the message size (nccl-tests: the whole logical buffer), and the deepscale op it corresponds to.
_SHIM = {
    "all_reduce": ("all_reduce", lambda a, k: _b(a[0])),
    "broadcast": ("broadcast", lambda a, k: _b(a[0])),
    "reduce": ("reduce", lambda a, k: _b(a[0])),
    "all_gather": ("all_gather", lambda a, k: sum(_b(t) for t in a[0])),
    "all_gather_single": ("all_gather_into_tensor", lambda a, k: _b(a[0])),
    "all_gather_into_tensor": ("all_gather_into_tensor", lambda a, k: _b(a[0])),
    "reduce_scatter": ("reduce_scatter", lambda a, k: sum(_b(t) for t in a[1])),
    "reduce_scatter_single": ("reduce_scatter_tensor", lambda a, k: _b(a[1])),
    "reduce_scatter_tensor": ("reduce_scatter_tensor", lambda a, k: _b(a[1])),
    "all_to_all_single": ("all_to_all_single", lambda a, k: _b(a[1])),
}


def _b(tensor):
    return tensor.numel() * tensor.element_size()


def _install_counting_shim(counts):
    """Wrap torch.distributed's collectives so every call adds its bytes to ``counts``; returns an undo."""
    import torch.distributed as tdist

    saved, depth = {}, [0]
    for name, (op, size) in _SHIM.items():
        original = getattr(tdist, name, None)
        if original is None:
            continue
        saved[name] = original

        def shim(*args, _original=original, _op=op, _size=size, **kwargs):
            if depth[0] == 0:  # count the outermost call only (deprecated names may forward)
                by_size = counts.setdefault(_op, {})
                nbytes = _size(args, kwargs)
                by_size[nbytes] = by_size.get(nbytes, 0) + 1
            depth[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(tdist, name, shim)
    return lambda: [setattr(tdist, name, fn) for name, fn in saved.items()]


def _engine_steps_counted(stage):
    import torch.distributed as tdist
    import deepscale
    import deepscale.comm as dist

    rank = tdist.get_rank()
    cfg = engine_config(2, 2, 2, zero_optimization={"stage": stage, "reduce_bucket_size": 100},
                        comms_logger={"enabled": True})
    engine, _, _, _ = deepscale.initialize(model=TokenNet(), config=cfg)
    counts = {}
    dist.reset_comms_log()
    undo = _install_counting_shim(counts)
    try:
        for step in range(2):
            for micro in range(2):
                engine.backward(engine(*token_batch(step, micro, rank, 2)))
                engine.step()
    finally:
        undo()
        summary = dist.log_summary(return_dict=True)
        dist.configure(enabled=False)
        dist.reset_comms_log()
        engine.destroy()
    return counts, summary


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_byte_counts_match_an_independent_count_of_torch_distributed_calls(stage):
    for counts, summary in run_distributed(_engine_steps_counted, 2, args=(stage,)):
        logged = {name: {size: row["count"] for size, row in by_size.items()} for name, by_size in summary.items()}
        assert counts, "the engine step made no collective calls"
        assert logged == counts
        for by_size in summary.values():
            for row in by_size.values():
                assert row["group_size"] == 2
                # every call of the step was waited for, so each has its latency
                assert len(row["latencies_ms"]) == row["count"] and all(t > 0 for t in row["latencies_ms"])


def _summary_body():
    import torch.distributed as tdist
    import deepscale.comm as dist

    world = tdist.get_world_size()
    x = torch.ones(1000)
    out = torch.zeros(1000 * world)
    dist.configure(enabled=False)
    dist.all_reduce(x)
    assert dist.log_summary(return_dict=True) == {}  # disabled: nothing recorded
    dist.configure(enabled=True, prof_all=True)
    try:
        for _ in range(3):
            dist.all_reduce(x)
        dist.all_gather_into_tensor(out, x, async_op=True).wait()
        dist.broadcast(x, 0, log_name="weights_broadcast")
        dist.reduce_scatter_tensor(torch.zeros(1000), torch.ones(1000 * world))
        dist.all_to_all_single(torch.zeros(1000 * world), torch.ones(1000 * world))
        full = dist.log_summary(show_straggler=True, return_dict=True)
        dist.reset_comms_log()
        after_reset = dist.log_summary(return_dict=True)
        dist.configure(prof_all=False, prof_ops=["all_reduce"])
        dist.all_reduce(x)
        dist.broadcast(x, 0)  # not in prof_ops: skipped
        dist.broadcast(x, 0, prof=True)  # forced
        selected = dist.log_summary(return_dict=True)
        lines = []
        dist.configure(verbose=True)
        from deepscale.utils.logging import logger
        logger.info, real_info = (lambda msg, *a, **k: lines.append(msg)), logger.info
        try:
            dist.all_reduce(x)
        finally:
            logger.info = real_info
    finally:
        dist.configure(enabled=False, prof_all=True, prof_ops=[], verbose=False)
        dist.reset_comms_log()
    return full, after_reset, selected, lines


def test_log_summary_dict_reset_and_op_selection():
    for full, after_reset, selected, verbose_lines in run_distributed(_summary_body, 2):
        assert sorted(full) == ["all_gather_into_tensor", "all_reduce", "all_to_all_single", "reduce_scatter_tensor",
                                "weights_broadcast"]
        for op in ("reduce_scatter_tensor", "all_to_all_single"):  # the input: 2 ranks x 4000 bytes
            assert list(full[op]) == [8000] and full[op][8000]["count"] == 1
            assert full[op][8000]["busbw_gbps"] == pytest.approx(full[op][8000]["algbw_gbps"] / 2)
        ar = full["all_reduce"][4000]
        assert ar["op"] == "all_reduce" and ar["count"] == 3 and len(ar["latencies_ms"]) == 3
        assert ar["total_latency_ms"] == pytest.approx(sum(ar["latencies_ms"]))
        assert ar["avg_latency_ms"] == pytest.approx(ar["total_latency_ms"] / 3)
        algbws = [4000 / (ms / 1e3) / 1e9 for ms in ar["latencies_ms"]]
        assert ar["algbw_gbps"] == pytest.approx(sum(algbws) / 3)
        assert ar["busbw_gbps"] == pytest.approx(ar["algbw_gbps"] * 2 * (2 - 1) / 2)
        ag = full["all_gather_into_tensor"][8000]  # the gathered output: 2 ranks x 4000 bytes
        assert ag["count"] == 1 and ag["busbw_gbps"] == pytest.approx(ag["algbw_gbps"] / 2)
        assert full["weights_broadcast"][4000]["op"] == "broadcast"
        assert all(row["straggler_ms"] >= 0 for by_size in full.values() for row in by_size.values())
        assert after_reset == {}
        assert {name: {s: r["count"] for s, r in v.items()} for name, v in selected.items()} == {
            "all_reduce": {4000: 1}, "broadcast": {4000: 1}}
        assert len(verbose_lines) == 1 and verbose_lines[0].startswith("comm op: all_reduce | time (ms): ")


def test_bus_bandwidth_factors_follow_nccl_tests():
    n = 8
    assert bus_bandwidth_factor("all_reduce", n) == pytest.approx(2 * 7 / 8)
    for op in ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single"):
        assert bus_bandwidth_factor(op, n) == pytest.approx(7 / 8)
    for op in ("broadcast", "reduce", "send", "recv"):
        assert bus_bandwidth_factor(op, n) == 1.0
    assert bandwidths("all_reduce", 2e9, 1.0, 4) == pytest.approx((2.0, 3.0))
    assert bandwidths("all_reduce", 100, 0.0, 4) == (0.0, 0.0)


def test_configure_reads_a_config_dict_and_rejects_bad_prof_ops():
    import deepscale.comm as dist

    try:
        dist.configure({"comms_logger": {"enabled": True, "prof_all": False, "prof_ops": ["all_gather"]}})
        assert dist.comms_logger.enabled and not dist.comms_logger.prof_all
        assert dist.comms_logger.prof_ops == ["all_gather"]
        with pytest.raises(TypeError, match="prof_ops"):
            dist.configure(prof_ops="all_reduce")
        with pytest.raises(TypeError, match="deepspeed_config"):
            dist.configure(deepspeed_config=42)
    finally:
        dist.configure(enabled=False, prof_all=True, prof_ops=[])
