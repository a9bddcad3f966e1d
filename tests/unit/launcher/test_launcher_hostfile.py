"""Hostfile parsing and node/slot selection."""
import pytest

from deepscale.launcher.hostfile import (filter_resources, limit_resources, parse_host_slots, parse_hostfile_text,
                                         read_hostfile)
from deepscale.launcher.world import WorldInfo

POOL_TEXT = "# comment\nworker-0 slots=4\n\n  worker-1 slots=2   # trailing comment\nworker-2 slots=4\n"


def test_parse_keeps_order_and_skips_comments():
    pool = parse_hostfile_text(POOL_TEXT)
    assert list(pool.items()) == [("worker-0", 4), ("worker-1", 2), ("worker-2", 4)]


@pytest.mark.parametrize("text, line, fragment", [
    ("a slots=2\nb\n", 2, "expected 'hostname slots=N'"),
    ("a slots=2\nb slots=0\n", 2, "positive integer"),
    ("a slots=2\n\nb slots=two\n", 3, "positive integer"),
    ("a slots=2\na slots=2\n", 2, "listed twice"),
    ("a gpus=2\n", 1, "expected 'hostname slots=N'"),
    ("a slots=2 extra\n", 1, "expected 'hostname slots=N'"),
    ("bad/host slots=1\n", 1, "not a valid hostname"),
])
def test_malformed_lines_name_the_line(text, line, fragment):
    with pytest.raises(ValueError, match=rf"hostfile hf line {line}: .*{fragment}"):
        parse_hostfile_text(text, source="hf")


def test_empty_or_missing_hostfile(tmp_path):
    with pytest.raises(ValueError, match="names no hosts"):
        parse_hostfile_text("# only comments\n")
    with pytest.raises(ValueError, match="does not exist"):
        read_hostfile(str(tmp_path / "nope"))
    path = tmp_path / "hf"
    path.write_text("n1 slots=1\n")
    assert read_hostfile(str(path)) == {"n1": 1}


def test_parse_host_slots_syntax():
    assert parse_host_slots("worker-0:0,2@worker-1", "--include") == {"worker-0": [0, 2], "worker-1": None}
    for bad in ("w:0,x", "w:1,1", "w@", "w@w", "w:-1"):
        with pytest.raises(ValueError, match="--include"):
            parse_host_slots(bad, "--include")


def test_include_exclude():
    pool = parse_hostfile_text(POOL_TEXT)
    assert filter_resources(pool) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1], "worker-2": [0, 1, 2, 3]}
    assert filter_resources(pool, include="worker-2:1,3@worker-0") == {"worker-0": [0, 1, 2, 3], "worker-2": [1, 3]}
    assert list(filter_resources(pool, include="worker-2@worker-0")) == ["worker-0", "worker-2"]  # hostfile order
    assert filter_resources(pool, exclude="worker-0:0,1@worker-1") == {"worker-0": [2, 3], "worker-2": [0, 1, 2, 3]}


def test_include_exclude_errors():
    pool = parse_hostfile_text(POOL_TEXT)
    with pytest.raises(ValueError, match="unknown host 'worker-9'; known hosts: worker-0, worker-1, worker-2"):
        filter_resources(pool, include="worker-9")
    with pytest.raises(ValueError, match="--exclude: unknown host"):
        filter_resources(pool, exclude="nope:0")
    with pytest.raises(ValueError, match="has 2 slot\\(s\\) .* slot 2 was requested"):
        filter_resources(pool, include="worker-1:2")
    with pytest.raises(ValueError, match="cannot be used together"):
        filter_resources(pool, include="worker-0", exclude="worker-1")
    with pytest.raises(ValueError, match="no hosts or slots are left"):
        filter_resources({"a": 1}, exclude="a:0")


def test_limit_resources():
    active = filter_resources(parse_hostfile_text(POOL_TEXT))
    assert limit_resources(active, num_nodes=2, num_slots=2) == {"worker-0": [0, 1], "worker-1": [0, 1]}
    with pytest.raises(ValueError, match="--num_nodes 4 requested but only 3 host"):
        limit_resources(active, num_nodes=4)
    with pytest.raises(ValueError, match="--num_gpus/--num_procs 3 requested but host 'worker-1' has only 2"):
        limit_resources(active, num_slots=3)


def test_world_info_rank_math_and_encoding():
    world = WorldInfo.from_resources({"a": [0, 1, 2], "b": [1, 3]})
    assert (world.num_nodes, world.world_size) == (2, 5)
    assert world.global_ranks(0) == [0, 1, 2] and world.global_ranks(1) == [3, 4]
    assert [world.node_of_rank(r) for r in range(5)] == [0, 0, 0, 1, 1]
    decoded = WorldInfo.decode(world.encode())
    assert decoded == world and decoded.hosts == ["a", "b"]
    assert set(world.encode()) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    with pytest.raises(ValueError, match="--world_info"):
        WorldInfo.decode("not-base64-json")
    with pytest.raises(ValueError, match="out of range"):
        world.host(2)
