"""The mutation script (tests/mutation/): snippets that moved are reported, not crashed on, and
every listed mutation applies to the code as it is now."""
import importlib.util
import sys
from pathlib import Path

import pytest

MUTATION_DIR = Path(__file__).resolve().parents[2] / "mutation"


def _load(name):
    sys.path.insert(0, str(MUTATION_DIR))
    try:
        spec = importlib.util.spec_from_file_location(name, MUTATION_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(MUTATION_DIR))


script = _load("run_mutations")
Mutation = _load("mutations").Mutation


def _mutation(old, path="pkg/mod.py"):
    return Mutation(name="m", bug_class="b", path=path, old=old, new="NEW", tests=("t",))


def test_apply_replaces_once_and_reports_moved_or_ambiguous_snippets(tmp_path):
    (tmp_path / "pkg").mkdir()
    target = tmp_path / "pkg" / "mod.py"
    target.write_text("a = 1\nb = 2\nb = 2\n")
    original, reason = script.apply(tmp_path, _mutation("a = 1\n"))
    assert reason is None and original == "a = 1\nb = 2\nb = 2\n" and target.read_text() == "NEWb = 2\nb = 2\n"
    target.write_text(original)
    assert "snippet not found" in script.apply(tmp_path, _mutation("c = 3"))[1]
    assert "snippet ambiguous (2 matches)" in script.apply(tmp_path, _mutation("b = 2\n"))[1]
    assert "file not found" in script.apply(tmp_path, _mutation("a", path="nope.py"))[1]
    assert target.read_text() == original  # nothing written when a mutation cannot apply


@pytest.mark.parametrize("outcome,expected", [
    (dict(timed_out=True, returncode=None, counts={}), "caught (timeout)"),
    (dict(timed_out=False, returncode=1, counts={"failed": 1}), "caught"),
    (dict(timed_out=False, returncode=0, counts={"passed": 3}), "MISSED"),
    (dict(timed_out=False, returncode=0, counts={"skipped": 3}), "not run (all skipped)"),
    (dict(timed_out=False, returncode=4, counts={}), "error (pytest exit 4)"),
    (dict(timed_out=False, returncode=-11, counts={}), "caught (crash, signal 11)"),
])
def test_verdicts(outcome, expected):
    assert script.verdict(outcome) == expected


def test_unknown_mutation_name_lists_the_choices():
    with pytest.raises(SystemExit, match="ckpt-latest-before-publish"):
        script.select(["no-such-mutation"])


def test_every_listed_mutation_applies_to_the_current_code():
    # Fails when code a mutation targets changes: refresh that entry in tests/mutation/mutations.py.
    repo = MUTATION_DIR.parents[1]
    stale = [f"{m.name} ({m.path})" for m in script.MUTATIONS
             if not (repo / m.path).is_file() or (repo / m.path).read_text().count(m.old) != 1]
    assert not stale, f"refresh these entries of tests/mutation/mutations.py: {stale}"
    assert all(m.old != m.new for m in script.MUTATIONS)
