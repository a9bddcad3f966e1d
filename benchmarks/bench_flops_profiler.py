"""Flops profiler accuracy: deepscale's and DeepSpeed's counts of a GPT training step against the
analytic count (6 x params x tokens + attention) and torch's FlopCounterMode, plus the cost of a
profiled step.

    python benchmarks/bench_flops_profiler.py                        # counts, single process
    python benchmarks/bench_flops_profiler.py --ds-python /work/venv-ds/bin/python --engine

``--ds-python`` runs DeepSpeed's profiler (its own install, a separate process) on the same model
and batch; ``--engine`` adds the engine's ``flops_profiler`` section at ZeRO 0 and 3, with and
without ``deepscale.checkpointing``, on ``--nproc`` gloo ranks. The model and the analytic count
live in tests/unit/profiling/flops_gpt.py. Prints tables and, last, one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "profiling"))

from benchmarks._bench_common import format_table, launch_ranks, median  # noqa: E402

IMPLS = ("manual", "sdpa")
CHECKPOINTS = ("none", "reentrant", "non_reentrant")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant for the overhead rows")
    p.add_argument("--ds-python", default=None, help="a Python with deepspeed installed (separate venv)")
    p.add_argument("--engine", action="store_true", help="add the engine rows (ZeRO 0 and 3, 2 ranks)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--worker", choices=("deepspeed", "engine"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default="none", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _shape(args):
    return dict(vocab=args.vocab, d_model=args.d_model, num_layers=args.n_layer, seq=args.seq, batch=args.batch)


def _model(args, impl, checkpoint):
    import torch
    from flops_gpt import GPT
    torch.manual_seed(0)
    return GPT(vocab=args.vocab, d_model=args.d_model, num_layers=args.n_layer, seq=args.seq, impl=impl,
               checkpoint=checkpoint)


def _timed_step(model, ids, labels):
    start = time.perf_counter()
    model(ids, labels).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _overhead(args, profiler_class):
    """Median step seconds unprofiled and profiled (start/end_profile around the step), interleaved.
    Both profilers share DeepSpeed's API, so ``profiler_class`` is either one."""
    from flops_gpt import batch_of
    model = _model(args, "manual", "none")
    ids, labels = batch_of(args.vocab, args.seq, args.batch)
    _timed_step(model, ids, labels)
    plain, profiled = [], []
    for _ in range(args.rounds):
        plain.append(_timed_step(model, ids, labels))
        t0 = time.perf_counter()
        prof = profiler_class(model)
        prof.start_profile()
        _timed_step(model, ids, labels)
        prof.end_profile()
        profiled.append(time.perf_counter() - t0)
    return median(plain), median(profiled)


def deepspeed_counts(args):
    """DeepSpeed's profiler on every model variant (run inside the DeepSpeed venv)."""
    import deepspeed
    from deepspeed.profiling.flops_profiler import FlopsProfiler
    from flops_gpt import batch_of
    ids, labels = batch_of(args.vocab, args.seq, args.batch)
    rows = {}
    for impl in IMPLS:
        for checkpoint in CHECKPOINTS:
            model = _model(args, impl, checkpoint)
            prof = FlopsProfiler(model)
            prof.start_profile()  # DeepSpeed's engine stops after forward: the forward-only figure
            loss = model(ids, labels)
            fwd = prof.get_total_flops()
            prof.end_profile()
            loss.backward()
            prof.start_profile()  # kept on through backward: what a standalone user may do
            model(ids, labels).backward()
            through_backward = prof.get_total_flops()
            prof.end_profile()
            rows[f"{impl}/{checkpoint}"] = {"fwd": fwd, "fwd_through_backward": through_backward}

    plain, profiled = _overhead(args, FlopsProfiler)
    return {"version": deepspeed.__version__, "rows": rows, "step_s": plain, "profiled_step_s": profiled}


def deepscale_counts(args):
    from torch.utils.flop_counter import FlopCounterMode
    from deepscale.profiling.flops_profiler import FlopsProfiler
    from flops_gpt import batch_of
    ids, labels = batch_of(args.vocab, args.seq, args.batch)
    rows = {}
    for impl in IMPLS:
        for checkpoint in CHECKPOINTS:
            model = _model(args, impl, checkpoint)
            prof = FlopsProfiler(model)
            prof.start_profile()
            model(ids, labels).backward()
            prof.stop_profile()
            phases = prof.get_flops_by_phase()
            model.zero_grad(set_to_none=True)
            with FlopCounterMode(display=False) as reference:
                model(ids, labels).backward()
            rows[f"{impl}/{checkpoint}"] = {
                "fwd": phases["forward"]["flops"], "bwd": phases["backward"]["flops"],
                "recompute": phases["recompute"]["flops"], "train": prof.get_training_flops(False),
                "train_with_other": prof.get_training_flops(False, include_other=True),
                "with_recompute": prof.get_training_flops(),
                "flop_counter_mode": reference.get_total_flops(), "params": prof.get_total_params()}
            prof.end_profile()

    plain, profiled = _overhead(args, FlopsProfiler)
    return {"rows": rows, "step_s": plain, "profiled_step_s": profiled}


def engine_worker(args):
    """One rank of an engine row: 3 optimizer steps; step 1 is counted, step 2 timed (see engine_profile.py)."""
    import torch
    import deepscale
    from flops_gpt import GPT, batch_of
    torch.manual_seed(0)
    fn = (lambda block, x: deepscale.checkpointing.checkpoint(block, x)) if args.checkpoint == "deepscale" else None
    model = GPT(vocab=args.vocab, d_model=args.d_model, num_layers=args.n_layer, seq=args.seq, checkpoint_fn=fn)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01}}, "zero_optimization": {"stage": args.stage},
           "flops_profiler": {"enabled": True, "profile_step": 1, "detailed": False,
                              "output_file": os.path.join(args.out, "profile.txt")}}
    if fn is not None:
        cfg["activation_checkpointing"] = {}
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    rank = engine.global_rank
    for step in range(3):
        ids, labels = batch_of(args.vocab, args.seq, args.batch, seed=step * 10 + rank)
        engine.backward(engine(ids, labels))
        engine.step()
    if rank == 0:
        with open(os.path.join(args.out, "rank0.json"), "w") as f:
            json.dump(engine._flops.last_profile, f)
    engine.destroy()


def engine_rows(args):
    rows = {}
    for stage in (0, 3):
        for checkpoint in ("none", "deepscale"):
            with tempfile.TemporaryDirectory() as out:
                argv = [sys.executable, os.path.abspath(__file__), "--worker", "engine", "--stage", str(stage),
                        "--checkpoint", checkpoint, "--out", out, "--vocab", str(args.vocab), "--d_model",
                        str(args.d_model), "--n_layer", str(args.n_layer), "--seq", str(args.seq), "--batch",
                        str(args.batch)]
                ok, message = launch_ranks(argv, args.nproc, 1, out, timeout_s=600)
                if not ok:
                    raise RuntimeError(f"engine row stage {stage} {checkpoint} failed: {message}")
                with open(os.path.join(out, "rank0.json")) as f:
                    rows[f"zero{stage}/{checkpoint}"] = json.load(f)
    return rows


def _ratio(value, reference):
    return f"{value / reference:.4f}" if reference else "n/a"


def main(argv=None):
    args = parse_args(argv)
    if args.worker == "deepspeed":
        json.dump(deepspeed_counts(args), sys.stdout)
        return
    if args.worker == "engine":
        engine_worker(args)
        return
    from flops_gpt import analytic_flops
    expected = analytic_flops(**_shape(args))
    ours = deepscale_counts(args)
    ds = None
    if args.ds_python:
        env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "tests", "unit", "profiling"))
        out = subprocess.run([args.ds_python, os.path.abspath(__file__), "--worker", "deepspeed", "--rounds",
                              str(args.rounds), "--vocab", str(args.vocab), "--d_model", str(args.d_model),
                              "--n_layer", str(args.n_layer), "--seq", str(args.seq), "--batch", str(args.batch)],
                             env=env, capture_output=True, text=True, check=True, cwd=REPO)
        ds = json.loads(out.stdout.strip().splitlines()[-1])
    table = []
    for key, row in ours["rows"].items():
        dsrow = ds["rows"][key] if ds else None
        train = expected["train_fused_attention" if key.startswith("sdpa") else "train"]
        table.append([key, _ratio(row["train"], train), _ratio(row["train_with_other"], train),
                      _ratio(row["fwd"], expected["forward"]), _ratio(row["recompute"], expected["block_forward"]),
                      _ratio(row["with_recompute"], row["flop_counter_mode"]),
                      _ratio(3 * dsrow["fwd"], expected["train"]) if ds else "-",
                      _ratio(dsrow["fwd_through_backward"], expected["forward"]) if ds else "-"])
    print(f"GPT vocab {args.vocab}, d_model {args.d_model}, {args.n_layer} layers, seq {args.seq}, batch "
          f"{args.batch}: analytic training step {expected['train']:.4g} flops, forward {expected['forward']:.4g}")
    print("train/analytic: sdpa rows against the fused-attention count (its backward recomputes QK^T, as "
          "torch.utils.flop_counter counts it); FlopCounterMode has no CPU formula for fused attention")
    print(format_table(["model/checkpointing", "train/analytic", "+other ops/analytic", "fwd/analytic",
                        "recompute/block fwd", "train+recompute/FlopCounterMode", "DS 3xfwd/analytic", "DS fwd kept thru bwd/analytic"], table))
    print(f"step time, median of {args.rounds}, interleaved: deepscale {ours['step_s'] * 1e3:.1f} ms plain, "
          f"{ours['profiled_step_s'] * 1e3:.1f} ms profiled" + (
              f"; DeepSpeed {ds['version']} {ds['step_s'] * 1e3:.1f} ms plain, {ds['profiled_step_s'] * 1e3:.1f} ms "
              f"profiled" if ds else ""))
    result = {"analytic": expected, "deepscale": ours, "deepspeed": ds}
    if args.engine:
        rows = engine_rows(args)
        print(format_table(["engine row", "params", "train/analytic", "+other ops/analytic", "recompute/block fwd",
                            "model GFLOPS", "fwd/bwd/step ms"],
                           [[k, r["params"], _ratio(r["training_flops"], expected["train"]),
                             _ratio(r["all_flops"] - r["hardware_flops"] + r["training_flops"], expected["train"]),
                             _ratio(r["phases"]["recompute"]["flops"], expected["block_forward"]),
                             f"{r['model_tflops'] * 1e3:.2f}",
                             "/".join(f"{r['latency_s'][p] * 1e3:.1f}" for p in ("forward", "backward", "step"))]
                            for k, r in rows.items()]))
        result["engine"] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
