"""offload_optimizer {cpu, nvme} at ZeRO stages 1-3 matches the same run without offload.

Two ranks on gloo, 10 steps of 2 micro-batches with gradient clipping; small buckets (200
elements) and ``sub_group_size`` 150 cut every master into several slabs and NVMe sub-groups.
"cpu" uses the CPU accelerator's own fp32 buffers as host buffers; "cpu_copy" forces the copies
a GPU makes (DEEPSCALE_OFFLOAD_SHARE_HOST=0). fp32: losses and final weights within 1e-6 relative (measured: identical at stages 1-2, 5e-8 at
stage 3, where slab boundaries change the chunking of the gradient norm). bf16: within 1e-3.
"""
import os

import pytest
import torch

from dist_harness import run_distributed
from _offload_helpers import offload_kwargs, swap_files
from _zero_test_helpers import build_engine, module_params, train

NUM_STEPS, GAS, CLIP = 10, 2, 0.05


def _run(stage, dtype, nvme_root, devices, offload_extra):
    import torch.distributed as dist
    from deepscale.runtime.offload.optimizer_offload import SHARE_HOST_ENV
    from deepscale.runtime.offload.settings import DEBUG_ENV
    extra_cfg = {dtype: {"enabled": True}} if dtype != "fp32" else {}
    out = {}
    for device in devices:
        root = os.path.join(nvme_root, device)
        # "cpu" uses the CPU accelerator's fp32 buffers in place; "cpu_copy" and "nvme" copy
        # gradients to separate host buffers and masters back, as on a GPU.
        os.environ[SHARE_HOST_ENV] = "1" if device == "cpu" else "0"
        kind = device.split("_")[0]
        extra = dict(offload_extra if kind != "none" else {})
        if extra.pop("debug", False):  # verify every swap-file read (sizes and CRCs)
            os.environ[DEBUG_ENV] = "1"
        try:
            engine = build_engine(stage, 2, gas=GAS, clip=CLIP, extra_cfg=extra_cfg, sub_group_size=150,
                                  **offload_kwargs(kind, root, **extra))
        finally:
            del os.environ[SHARE_HOST_ENV]
            os.environ.pop(DEBUG_ENV, None)
        losses = train(engine, 2, range(NUM_STEPS), gas=GAS)
        files = swap_files(root)
        out[device] = (losses, module_params(engine), files)
        engine.destroy()
        dist.barrier()
        out[device] += (swap_files(root),)
    return out


def _check(results, rtol, devices):
    for per_rank in results:
        base_losses, base_params, _, _ = per_rank["none"]
        for device in devices:
            losses, params, files_during, files_after = per_rank[device]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), rtol=rtol, atol=0,
                                       msg=lambda m: f"offload {device} losses: {m}")
            for name, want in base_params.items():
                rel = ((params[name] - want).norm() / want.norm()).item()
                assert rel <= rtol, f"offload {device} {name}: relative error {rel:.2e}"
            if device == "nvme":
                assert any(f.endswith(".master.swp") for f in files_during), files_during
                assert any(f.endswith(".exp_avg_sq.swp") for f in files_during), files_during
                assert files_after == [], f"swap files left after destroy: {files_after}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp32_offload_matches_no_offload(stage, tmp_path):
    devices = ("none", "cpu", "cpu_copy", "nvme")
    _check(run_distributed(_run, 2, args=(stage, "fp32", str(tmp_path), devices, {})), 1e-6, devices[1:])


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_offload_matches_no_offload(stage, tmp_path):
    devices = ("none", "cpu", "nvme")
    _check(run_distributed(_run, 2, args=(stage, "bf16", str(tmp_path), devices, {})), 1e-3, devices[1:])


@pytest.mark.parametrize("extra", [
    {"pipeline_read": True, "pipeline_write": True, "buffer_count": 3, "debug": True},
    {"pipeline_read": True, "pipeline_write": True, "buffer_count": 1},
    {"pipeline_read": True, "buffer_count": 2, "pin_memory": True},
], ids=["full_overlap_debug", "one_buffer", "read_ahead_pinned"])
def test_nvme_pipelines_keep_numerics(extra, tmp_path):
    devices = ("none", "nvme")
    _check(run_distributed(_run, 2, args=(2, "fp32", str(tmp_path), devices, extra)), 1e-6, devices[1:])


@pytest.mark.parametrize("stage", [2, 3])
def test_twin_flow_ratio_keeps_numerics(stage, tmp_path):
    # ratio 0.5: about half the slabs step where the model lives, half on the host
    devices = ("none", "cpu", "cpu_copy")
    _check(run_distributed(_run, 2, args=(stage, "fp32", str(tmp_path), devices, {"ratio": 0.5})), 1e-6,
           devices[1:])
