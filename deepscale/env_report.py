"""``deepscale report``: what this installation can run, and why an op is not compiled.

Prints torch / CUDA / compiler / nvcc versions, the accelerator, the SIMD level, and a table
with one row per op: built ahead of time, cached by a JIT build, JIT-compatible, and the
reason when it is not. Nothing is compiled by the report.
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys


def _first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text and out.returncode == 0 else None


def collect():
    """The report as a dict: ``environment`` (name -> value) and ``ops`` (list of row dicts)."""
    import torch

    import deepscale
    from deepscale.accelerator import get_accelerator
    from op_builder import ALL_OPS, cache_root, installed_ops
    from op_builder.fused_adam import find_nvcc, nvcc_version
    from op_builder.simd import detect_simd_level

    cxx = None
    for builder_cls in ALL_OPS.values():
        cxx = builder_cls().compiler()
        break
    nvcc = find_nvcc()
    version = nvcc_version()
    env = {
        "deepscale": deepscale.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA available": str(torch.cuda.is_available()),
        "accelerator": get_accelerator().device_name(),
        "C++ compiler": (_first_line([cxx, "--version"]) or "not found") if shutil.which(cxx) else f"not found ({cxx})",
        "nvcc": f"{version[0]}.{version[1]} ({nvcc})" if version else "not found",
        "ninja": _first_line(["ninja", "--version"]) or "not found",
        "SIMD level": detect_simd_level(),
        "op cache": str(cache_root()),
    }
    aot = installed_ops()
    rows = []
    for name, builder_cls in ALL_OPS.items():
        builder = builder_cls()
        compat = builder.is_compatible()
        try:
            cached = (builder.build_dir() / "built.json").is_file()
        except Exception:  # an unreadable source tree must not break the report
            cached = False
        rows.append({"op": name, "installed": name in aot, "cached": cached, "compatible": bool(compat),
                     "reason": compat.reason})
    return {"environment": env, "ops": rows}


def format_report(report):
    """The human-readable text of :func:`collect`'s result."""
    env = report["environment"]
    width = max(len(k) for k in env)
    lines = ["deepscale environment report", "-" * 60]
    lines += [f"{key:<{width}} : {value}" for key, value in env.items()]
    op_width = max([len(row["op"]) + 2 for row in report["ops"]] + [13])
    lines += ["", f"{'op':<{op_width}}{'installed':<11}{'cached':<8}{'compatible':<12}reason", "-" * 60]
    for row in report["ops"]:
        installed, cached = ("yes" if row[key] else "no" for key in ("installed", "cached"))
        lines.append(f"{row['op']:<{op_width}}{installed:<11}{cached:<8}"
                     f"{('yes' if row['compatible'] else 'NO'):<12}{row['reason']}")
    lines += ["", "installed: built ahead of time (DEEPSCALE_BUILD_OPS=1 at install); cached: a JIT build is in "
              "the op cache; compatible: can be JIT-built here. An op that is neither runs its PyTorch fallback."]
    return "\n".join(lines)


def main(argv=None):
    """Print the report (``--json`` for a JSON line); returns 0."""
    parser = argparse.ArgumentParser(prog="deepscale report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
