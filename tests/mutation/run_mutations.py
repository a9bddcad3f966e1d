"""Break core mechanisms one at a time and report which tests notice.

Usage (from anywhere; on a shared machine under ``nice``)::

    nice -n 10 python tests/mutation/run_mutations.py              # every mutation
    python tests/mutation/run_mutations.py --list                  # names, files, tests
    python tests/mutation/run_mutations.py --only ckpt-latest-before-publish --timeout 300

The working tree is never edited: the tracked and untracked (not ignored) files are copied to
a temporary directory once, each mutation is applied there, its tests run, and the file is
restored before the next one. Compiled ops rebuild in a JIT cache of their own (content
hashed, so unmutated builds are shared between mutations). Not part of CI; see README.md.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutations import MUTATIONS  # noqa: E402  (this directory is not a package)

REPO_ROOT = Path(__file__).resolve().parents[2]
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def copy_repo(dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files of the repository to ``dest``."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listing.split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(root: Path, tests, timeout: float, op_cache: str) -> dict:
    """Run pytest on ``tests`` inside ``root``; returns the outcome as a dict."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", DEEPSCALE_OP_CACHE=op_cache)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    # A session of its own, so a timeout can stop pytest together with the ranks it spawned.
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    counts = {}
    lines = output.strip().splitlines()
    for word_count, word in _SUMMARY.findall(lines[-1] if lines else ""):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(word_count)
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"returncode": None if timed_out else proc.returncode, "timed_out": timed_out, "counts": counts,
            "failed": failed, "seconds": round(time.monotonic() - start, 1), "tail": "\n".join(lines[-15:])}


def verdict(outcome: dict) -> str:
    """caught / missed / not run / error, from a pytest outcome."""
    if outcome["timed_out"]:
        return "caught (timeout)"
    rc, counts = outcome["returncode"], outcome["counts"]
    if rc == 0:
        return "MISSED" if counts.get("passed", 0) else "not run (all skipped)"
    if rc == 1:
        return "caught"
    if rc is not None and rc < 0:  # pytest itself died (a kernel wrote out of bounds)
        return f"caught (crash, signal {-rc})"
    return f"error (pytest exit {rc})"


def apply(root: Path, mutation):
    """Apply ``mutation`` in ``root``; returns the original text, or a reason it cannot apply."""
    path = root / mutation.path
    if not path.is_file():
        return None, f"file not found: {mutation.path}"
    text = path.read_text()
    matches = text.count(mutation.old)
    if matches != 1:
        what = "snippet not found" if matches == 0 else f"snippet ambiguous ({matches} matches)"
        return None, f"{what} in {mutation.path}: update tests/mutation/mutations.py"
    path.write_text(text.replace(mutation.old, mutation.new))
    return text, None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's tests (default 900)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that the selected tests pass without mutations")
    parser.add_argument("--op-cache", default=None, help="JIT op cache for the copies (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy of the repository")
    return parser.parse_args(argv)


def select(names):
    known = {m.name for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; choices: {sorted(known)}")
    return [m for m in MUTATIONS if not names or m.name in names]


def print_table(rows) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"\n{'mutation':<{width}}  {'verdict':<24}  {'s':>6}  failing tests / reason")
    for r in rows:
        detail = r.get("reason") or ", ".join(r.get("failed", [])) or "-"
        print(f"{r['name']:<{width}}  {r['verdict']:<24}  {r.get('seconds', 0):>6}  {detail}")


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = select(args.only)
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug_class}\n    {m.path}\n    tests: {' '.join(m.tests)}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="deepscale-mutation-"))
    root, op_cache = work / "repo", args.op_cache or str(work / "op_cache")
    root.mkdir()
    copy_repo(root)
    rows, baseline_failed = [], set()
    try:
        if not args.skip_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            base = run_tests(root, tests, args.timeout * 2, op_cache)
            baseline_failed = set(base["failed"])
            state = "passed" if base["returncode"] == 0 else "timed out" if base["timed_out"] else "FAILED"
            print(f"baseline (no mutation): {state} {base['counts']} in {base['seconds']} s"
                  + (f"; failing without any mutation: {sorted(baseline_failed)}" if baseline_failed else ""))
            if base["timed_out"] or base["returncode"] not in (0, 1):
                print(base["tail"])
        for m in chosen:
            original, reason = apply(root, m)
            if reason:
                rows.append({"name": m.name, "verdict": "not applied", "reason": reason})
                print(f"{m.name}: not applied: {reason}", flush=True)
                continue
            try:
                outcome = run_tests(root, m.tests, args.timeout, op_cache)
            finally:
                (root / m.path).write_text(original)
            failed = [t for t in outcome["failed"] if t not in baseline_failed]
            row = {"name": m.name, "bug_class": m.bug_class, "verdict": verdict(outcome), "failed": failed,
                   "counts": outcome["counts"], "seconds": outcome["seconds"]}
            if outcome["failed"] and not failed:
                row["verdict"], row["reason"] = "MISSED", "only tests that fail without the mutation failed"
            rows.append(row)
            print(f"{m.name}: {row['verdict']} in {row['seconds']} s", flush=True)
            if row["verdict"].startswith("error"):
                print(outcome["tail"])
    finally:
        if args.keep:
            print(f"copy kept at {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    summary = {v: sum(r["verdict"].startswith(v) for r in rows) for v in ("caught", "MISSED", "not", "error")}
    print(json.dumps({"mutations": rows, "caught": summary["caught"], "missed": summary["MISSED"],
                      "not_applied_or_skipped": summary["not"], "errors": summary["error"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
