"""`deepscale report`: environment lines and one row per op with its verdict."""
import json

from _ops_test_helpers import run_python
from deepscale import env_report
from op_builder import ALL_OPS


def test_main_prints_the_op_table(capsys):
    assert env_report.main([]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "torch CUDA", "C++ compiler", "nvcc", "accelerator", "SIMD level"):
        assert f"\n{key}" in out
    rows = [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0] in ALL_OPS]
    assert sorted(rows) == sorted(ALL_OPS)


def test_json_report_has_reasons_for_incompatible_ops(capsys):
    env_report.main(["--json"])
    report = json.loads(capsys.readouterr().out)
    assert {row["op"] for row in report["ops"]} == set(ALL_OPS)
    for row in report["ops"]:
        assert row["compatible"] or row["reason"]


def test_report_shows_missing_compiler_as_the_reason(tmp_path):
    result = run_python("import sys; from deepscale.env_report import main; sys.exit(main([]))",
                        {"PATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    cpu_adam = [ln for ln in result.stdout.splitlines() if ln.startswith("cpu_adam")][0]
    assert "NO" in cpu_adam and "no C++ compiler" in cpu_adam
