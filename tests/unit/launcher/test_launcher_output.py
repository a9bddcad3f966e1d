"""Launcher defaults for CPU ranks: OMP_NUM_THREADS per rank, and live, unbroken rank output."""
import os
import re
import select
import subprocess
import textwrap
import time

import pytest

from _launcher_helpers import (ENV_SCRIPT, base_env, deepscale_cmd, free_port, read_records, run_deepscale,
                               stop_process_group, write_script)
from deepscale.launcher.output import OutputTail, split_lines
from deepscale.launcher.threads import default_omp_threads, usable_cores

pytestmark = pytest.mark.timeout(120)


def _env_without_threads(out, **extra):
    env = base_env(out, **extra)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if name not in extra:
            env.pop(name, None)
    return env


# --- OMP_NUM_THREADS ------------------------------------------------------------------------
def test_default_threads_share_the_cores():
    assert default_omp_threads({}, 2, cores=16)[0] == 8
    assert default_omp_threads({}, 3, cores=16)[0] == 5
    assert default_omp_threads({}, 4, cores=2)[0] == 1  # never 0
    threads, message = default_omp_threads({}, 2, cores=2)
    assert threads == 1 and "OMP_NUM_THREADS=1" in message and "set OMP_NUM_THREADS" in message
    assert default_omp_threads({"OMP_NUM_THREADS": "7"}, 2, cores=16) == (None, "")  # the user's choice wins
    assert default_omp_threads({}, 1, cores=16) == (None, "")  # one rank: torch's own default
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    assert usable_cores([]) == 1


def test_ranks_get_their_share_of_cores_unless_the_user_chose(tmp_path, out):
    script = write_script(tmp_path, "env.py", ENV_SCRIPT)
    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), script], _env_without_threads(out),
                           tmp_path)
    assert result.returncode == 0, result.stderr
    share = str(max(1, usable_cores() // 2))
    assert [r["OMP_NUM_THREADS"] for r in read_records(out, 2).values()] == [share, share]
    assert f"each of the 2 local ranks gets OMP_NUM_THREADS={share}" in result.stdout

    result = run_deepscale(["--num_procs", 2, "--master_port", free_port(), script],
                           _env_without_threads(out, OMP_NUM_THREADS=3), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["OMP_NUM_THREADS"] for r in read_records(out, 2).values()] == ["3", "3"]
    assert "OMP_NUM_THREADS is not set" not in result.stdout


# --- live forwarding ------------------------------------------------------------------------
# Draws a "\r" progress bar on stderr, then holds the run open until the test releases it.
PROGRESS_SCRIPT = textwrap.dedent("""
    import os, sys, time
    for i in range(6):
        sys.stderr.write("\\rprogress %d/6" % i)
        sys.stderr.flush()
        time.sleep(0.1)
    release = os.path.join(os.environ["TEST_OUT_DIR"], "release")
    deadline = time.time() + 60
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.05)
    sys.stderr.write("\\rprogress 6/6\\n")
""")


def _read_until(proc, stream, pattern, timeout):
    """Read ``stream`` of the running ``proc`` until ``pattern`` (bytes regex) matches what was read."""
    seen, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"{pattern!r} did not arrive within {timeout}s; got {seen!r}")


def test_progress_bar_updates_arrive_while_the_rank_runs(tmp_path, out):
    script = write_script(tmp_path, "progress.py", PROGRESS_SCRIPT)
    proc = subprocess.Popen(deepscale_cmd("--master_port", free_port(), "--rank_prefix", script),
                            env=base_env(out), cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = _read_until(proc, proc.stderr, rb"\[rank 0\] progress 4/6\r", timeout=30)
        assert proc.poll() is None  # the update came through before the run ended
        assert b"[rank 0] progress 1/6\r[rank 0] progress 2/6\r" in seen
        (out / "release").touch()
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
        assert (seen + rest).endswith(b"[rank 0] progress 6/6\n")
    finally:
        stop_process_group(proc)


# Every rank writes its own letter in lines of 120 characters, each line in several small,
# flushed pieces, so both ranks have half-written lines in the pipe at the same time.
PIECES_SCRIPT = textwrap.dedent("""
    import os, sys, time
    rank = int(os.environ["RANK"])
    letter = "AB"[rank]
    for line in range(150):
        for piece in range(4):
            sys.stdout.write(letter * 30 + ("\\n" if piece == 3 else ""))
            sys.stdout.flush()
            if (line + piece) % 7 == rank:
                time.sleep(0.001)
""")


@pytest.mark.parametrize("prefix", [False, True])
def test_ranks_never_interleave_within_a_line(tmp_path, out, prefix):
    script = write_script(tmp_path, "pieces.py", PIECES_SCRIPT)
    args = ["--num_procs", 2, "--master_port", free_port()] + (["--rank_prefix"] if prefix else []) + [script]
    result = run_deepscale(args, base_env(out), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln and "[deepscale]" not in ln]
    expected = {"[rank 0] " + "A" * 120, "[rank 1] " + "B" * 120} if prefix else {"A" * 120, "B" * 120}
    assert set(lines) == expected
    assert len(lines) == 300


def test_output_tail_keeps_whole_lines_and_the_latest_bar_state():
    read_fd, write_fd = os.pipe()
    target_r, target_w = os.pipe()
    tail = OutputTail(prefix=b"> ")
    with os.fdopen(read_fd, "rb", buffering=0) as pipe, os.fdopen(target_w, "wb") as target:
        tail.attach(pipe, target)
        for piece in (b"hel", b"lo\n\r 10%", b"\r 20%", b"\r 30%|done\n", b"unfinished"):
            os.write(write_fd, piece)
            time.sleep(0.02)
        os.close(write_fd)
        tail.join(5.0)
    with os.fdopen(target_r, "rb") as forwarded:
        assert forwarded.read() == b"> hello\n>  10%\r>  20%\r>  30%|done\n> unfinished"
    assert tail.lines() == ["hello", " 30%|done", "unfinished"]
    assert split_lines(b"a", b"b\r\nc\rd") == ([b"ab\r\n", b"c\r"], b"d")
