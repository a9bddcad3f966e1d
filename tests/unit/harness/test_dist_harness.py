"""Tests of the multi-process test harness (tests/unit/dist_harness.py)."""
import os
import time

import pytest

from dist_harness import DistributedTestError, DistributedTimeoutError, run_distributed


def _rank_times(x):
    import torch.distributed as dist
    return dist.get_rank() * x


def _identity():
    import torch
    import torch.distributed as dist
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE",
                                           "MASTER_ADDR", "MASTER_PORT", "DEEPSCALE_ACCELERATOR")},
        "threads": torch.get_num_threads(),
        "backend": dist.get_backend(),
    }


def _all_reduce_sum():
    import torch
    import torch.distributed as dist
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return t.item()


def _pid():
    return os.getpid()


def _raise_on_rank1():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise RuntimeError("boom from the body")
    # rank 0 blocks in a collective that rank 1 never joins
    dist.barrier()
    return "unreachable"


def _sleep_on_rank1(seconds):
    import torch.distributed as dist
    if dist.get_rank() == 1:
        time.sleep(seconds)
    return dist.get_rank()


def _random_draw_and_leave_groups():
    import torch
    import torch.distributed as dist
    dist.new_group(ranks=list(range(dist.get_world_size())))  # left behind on purpose
    os.environ["HARNESS_TEST_LEAK"] = "1"
    return torch.rand(3).tolist()


def _groups_and_env():
    from torch.distributed import distributed_c10d as c10d
    return len(c10d._world.pg_map), os.environ.get("HARNESS_TEST_LEAK")


def _skip_everywhere():
    pytest.skip("body asked to skip")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_indexed_by_rank(world_size):
    assert run_distributed(_rank_times, world_size, args=(3,)) == [3 * r for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_worker_environment(world_size):
    infos = run_distributed(_identity, world_size)
    ports = {info["env"]["MASTER_PORT"] for info in infos}
    assert len(ports) == 1
    for rank, info in enumerate(infos):
        assert info["rank"] == rank and info["world"] == world_size
        assert info["env"]["RANK"] == info["env"]["LOCAL_RANK"] == str(rank)
        assert info["env"]["WORLD_SIZE"] == info["env"]["LOCAL_SIZE"] == str(world_size)
        assert info["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert info["env"]["DEEPSCALE_ACCELERATOR"] == "cpu"
        assert info["threads"] == 1
        assert info["backend"] == "gloo"


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_in_body(world_size):
    expected = float(sum(range(1, world_size + 1)))
    assert run_distributed(_all_reduce_sum, world_size) == [expected] * world_size


def test_pool_is_reused():
    first = run_distributed(_pid, 2)
    second = run_distributed(_pid, 2)
    assert first == second
    assert len(set(first)) == 2 and os.getpid() not in first


def test_state_is_reset_between_bodies():
    first = run_distributed(_random_draw_and_leave_groups, 2)
    assert first[0] == first[1]  # same seed on every rank
    assert run_distributed(_random_draw_and_leave_groups, 2) == first  # reseeded
    # the leaked group was destroyed and the env restored: only the default group is left
    assert run_distributed(_groups_and_env, 2) == [(1, None), (1, None)]


def test_rank_error_names_rank_and_traceback():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1, 2, timeout=60)
    message = str(info.value)
    assert "rank 1 raised" in message
    assert "RuntimeError: boom from the body" in message
    assert "_raise_on_rank1" in message  # the traceback text, not just the exception
    assert info.value.errors.keys() == {1}
    assert info.value.unfinished == [0]  # rank 0 was stuck in the barrier
    # the pool was killed and is recreated on next use
    assert run_distributed(_rank_times, 2, args=(5,)) == [0, 5]


def test_hang_is_reported_and_pool_recreated():
    before = run_distributed(_pid, 2)
    start = time.monotonic()
    with pytest.raises(DistributedTimeoutError) as info:
        run_distributed(_sleep_on_rank1, 2, args=(60,), timeout=3)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "timed out after 3.0 s" in message
    assert "finished ranks: [0]" in message and "did not finish: ranks [1]" in message
    assert info.value.unfinished == [1]
    after = run_distributed(_pid, 2)
    assert set(after).isdisjoint(before)  # fresh workers
    assert run_distributed(_sleep_on_rank1, 2, args=(0,)) == [0, 1]


def test_skip_inside_body_skips_test():
    with pytest.raises(pytest.skip.Exception, match="body asked to skip"):
        run_distributed(_skip_everywhere, 1)


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="module-level"):
        run_distributed(lambda: 0, 1)
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_pid, 0)
    with pytest.raises(ValueError, match="backend must be one of gloo, nccl"):
        run_distributed(_pid, 1, backend="mpi")
    with pytest.raises(ValueError, match="timeout"):
        run_distributed(_pid, 1, timeout=0)


def test_nccl_skips_without_enough_gpus():
    import torch
    if torch.cuda.device_count() >= 64:
        pytest.skip("machine has 64 GPUs")
    with pytest.raises(pytest.skip.Exception, match=r"needs 64 GPUs, found \d+"):
        run_distributed(_pid, 64, backend="nccl")


_INNER_TESTS = '''
import os
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass

def test_backend_env():
    print("BACKEND=" + os.environ.get("DEEPSCALE_TEST_BACKEND", "unset"))
'''


def _run_inner_pytest(tmp_path, *options):
    """Run tests/conftest.py's hooks in a separate pytest process on a tiny test file."""
    import shutil
    import subprocess
    import sys
    tests_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copy(os.path.join(tests_dir, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(_INNER_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "DEEPSCALE_TEST_BACKEND"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-s", "-q", *options, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def test_gpu_marker_and_backend_option(tmp_path):
    import torch
    rc, out = _run_inner_pytest(tmp_path, "--dist-backend", "nccl")
    assert "BACKEND=nccl" in out
    if torch.cuda.is_available():
        assert rc == 0 and "2 passed" in out
    else:
        assert rc == 0 and "SKIPPED" in out and "needs CUDA" in out and "1 skipped" in out
    rc, out = _run_inner_pytest(tmp_path, "--dist-backend", "mpi")
    assert rc != 0 and "invalid choice: 'mpi'" in out
