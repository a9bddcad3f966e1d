"""The mechanisms the mutation script breaks, one at a time, and the tests that should notice.

Each entry replaces one exact snippet of one file (it must occur exactly once) and names the
pytest node ids expected to fail. When code moves, the script reports "snippet not found"
for the entry instead of crashing: update ``old`` (and ``new``) to the code as it is now.
Keep snippets short and specific: a line or two that carries the mechanism.
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug.

    Attributes:
        name: short id (``--only`` takes it).
        bug_class: the real-world bug this mimics.
        path: file to change, relative to the repository root.
        old: exact snippet to replace (must occur exactly once in ``path``).
        new: its replacement.
        tests: pytest node ids (files, classes or single tests) that should fail.
    """

    name: str
    bug_class: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]


_ROBUST = "tests/unit/runtime/test_checkpoint_robustness.py"
_AIO = "tests/unit/ops/test_aio.py"
_PRECISION_GRADS = "tests/unit/runtime/test_precision_grads.py"
_SGD_PARITY = "tests/unit/zero/test_sgd_grad_norm_parity.py"

MUTATIONS = (
    Mutation(
        name="ckpt-latest-before-publish",
        bug_class="`latest` written before the checkpoint directory is published",
        path="deepscale/runtime/checkpoint/atomic.py",
        old="        try:\n            os.rename(self.staging_path, self.final_path)\n",
        new=("        if update_latest:\n"
             "            write_latest_tag(self.save_dir, self.tag)\n"
             "        try:\n            os.rename(self.staging_path, self.final_path)\n"),
        tests=(f"{_ROBUST}::test_latest_never_names_an_unpublished_directory",
               "tests/unit/runtime/test_checkpoint.py::test_killed_save_leaves_previous_checkpoint_loadable"),
    ),
    Mutation(
        name="ckpt-loss-scaler-not-restored",
        bug_class="the fp16 loss scaler not restored on resume",
        path="deepscale/runtime/checkpoint/portable.py",
        old='                loss_scaler.load_state_dict(shard["loss_scaler"])',
        new="                pass",
        tests=(f"{_ROBUST}::test_fp16_resume_restores_the_loss_scaler_exactly",
               "tests/unit/runtime/test_checkpoint.py::test_resume_reproduces_uninterrupted_run"),
    ),
    Mutation(
        name="ckpt-no-status-exchange",
        bug_class="a rank failing while saving leaves the others waiting at a barrier",
        path="deepscale/runtime/checkpoint/engine_checkpoint.py",
        old='    _raise_if_failed(_failures_on_any_rank(error), "writing the checkpoint files", target, error)\n',
        new="    if error is not None:\n        raise error\n    dist.barrier()\n",
        tests=(f"{_ROBUST}::test_rank_failing_inside_save_fails_the_save_on_every_rank",),
    ),
    Mutation(
        name="ckpt-full-disk-unexplained",
        bug_class="a save into a full disk fails with torch's 'unexpected pos' and no path",
        path="deepscale/utils/checkpoint_files.py",
        old="            raise CheckpointDiskFullError(path, free, needed) from exc\n",
        new="            raise\n",
        tests=(f"{_ROBUST}::test_full_disk_fails_on_every_rank_and_keeps_the_previous_checkpoint",),
    ),
    Mutation(
        name="ckpt-staging-left-behind",
        bug_class="staging directories of a crashed save accumulate forever",
        path="deepscale/runtime/checkpoint/atomic.py",
        old="        if name.startswith(_TMP_PREFIX):\n            _remove(path)\n",
        new="        if name.startswith(_TMP_PREFIX):\n            continue\n",
        tests=(f"{_ROBUST}::test_staging_left_by_a_crashed_save_is_removed_on_next_load_and_save",
               f"{_ROBUST}::test_rank_failing_inside_save_fails_the_save_on_every_rank"),
    ),
    Mutation(
        name="ckpt-corrupt-file-unnamed",
        bug_class="a truncated checkpoint file gives an error that does not name it",
        path="deepscale/utils/checkpoint_files.py",
        old='        raise CorruptCheckpointError(path, f"{type(exc).__name__}: {exc}") from exc\n',
        new="        raise\n",
        tests=(f"{_ROBUST}::test_damaged_checkpoint_file_error_names_the_file",),
    ),
    Mutation(
        name="cpu-optim-tile-edge-twice",
        bug_class="the CPU Adam kernel updating tile-boundary elements twice",
        path="csrc/cpu_optim/optim_driver.h",
        old="std::min(kTileElems, slots[s].numel - b)",
        new="std::min(kTileElems + 1, slots[s].numel - b)",
        tests=("tests/unit/ops/test_cpu_optimizer_tiles.py",
               "tests/unit/ops/test_cpu_optimizer_numerics.py::test_fp32_params_match_float64_reference",
               "tests/unit/ops/test_cpu_optimizer_numerics.py::test_thread_count_does_not_change_results"),
    ),
    Mutation(
        name="cpu-optim-vector-overruns-tile",
        bug_class="the SIMD body runs past the tile end (the next tile's first elements updated twice)",
        path="csrc/cpu_optim/optim_driver.h",
        old="for (; i + kWidth <= n; i += kWidth) {",
        new="for (; i < n; i += kWidth) {",
        tests=("tests/unit/ops/test_cpu_optimizer_tiles.py",
               "tests/unit/ops/test_cpu_optimizer_numerics.py::test_fp32_params_match_float64_reference"),
    ),
    Mutation(
        name="aio-noncontiguous-read-dropped",
        bug_class="async reads into non-contiguous tensors never copied back",
        path="deepscale/ops/aio/handle.py",
        old="        return staging, lambda: tensor.copy_(staging)\n",
        new="        return staging, None\n",
        tests=(f"{_AIO}::test_reads_into_and_writes_from_non_contiguous_tensors",),
    ),
    Mutation(
        name="aio-write-error-not-raised-at-wait",
        bug_class="a failed asynchronous write is not reported at wait()",
        path="deepscale/ops/aio/handle.py",
        old="        if first_error is not None:\n            _raise_for(*first_error)\n",
        new="        if first_error is not None:\n            pass\n",
        tests=(f"{_AIO}::test_failed_async_write_is_reported_at_wait_on_a_full_disk",
               f"{_AIO}::test_failed_async_write_to_a_device_is_reported_at_wait",
               f"{_AIO}::test_full_disk_is_an_oserror_with_the_path"),
    ),
    Mutation(
        name="aio-native-completion-error-ignored",
        bug_class="the compiled engine drops the error of a failed block write",
        path="csrc/aio/aio_engine.cpp",
        old="        r.error.store(static_cast<int>(-result));\n        return;\n",
        new="        return;\n",
        tests=(f"{_AIO}::test_failed_async_write_is_reported_at_wait_on_a_full_disk",
               f"{_AIO}::test_failed_async_write_to_a_device_is_reported_at_wait"),
    ),
    # The gradient path (stage 0-3 reducers, the shared TrainingOptimizer step, precision).
    Mutation(
        name="dp-average-missing",
        bug_class="data-parallel gradients summed, not averaged (1/world_size dropped)",
        path="deepscale/runtime/grad_reducer.py",
        old="            post_scale = self.predivide_factor / self.average_world_size\n",
        new="            post_scale = self.predivide_factor\n",
        tests=("tests/unit/runtime/test_grad_reducer.py", "tests/unit/runtime/test_engine_parity.py",
               _SGD_PARITY),
    ),
    Mutation(
        name="fp16-clip-on-scaled-norm",
        bug_class="fp16 gradient clipping compares the loss-scaled norm with the threshold",
        path="deepscale/runtime/precision/precision_optimizer.py",
        old=("        if self.clip_grad > 0 and norm / scale > self.clip_grad:\n"
             "            coef *= self.clip_grad / (norm / scale + 1e-6)\n"),
        new=("        if self.clip_grad > 0 and norm > self.clip_grad:\n"
             "            coef *= self.clip_grad / (norm + 1e-6)\n"),
        tests=(f"{_PRECISION_GRADS}::test_fp16_clipping_uses_the_unscaled_norm",
               "tests/unit/runtime/test_fp16_overflow.py"),
    ),
    Mutation(
        name="bf16-grad-accumulation-in-bf16",
        bug_class="bf16 gradients accumulated in bf16 instead of fp32",
        path="deepscale/runtime/engine_setup.py",
        old="    accum = accum or torch.float32\n",
        new="    accum = accum or model_dtype\n",
        tests=(f"{_PRECISION_GRADS}::test_bf16_accumulates_micro_steps_in_fp32",),
    ),
    Mutation(
        name="foreign-backward-consumed",
        bug_class="an engine's gradient hooks take gradients from another engine's backward (GAN loops)",
        path="deepscale/runtime/grad_reducer.py",
        old="        if not self._armed:\n            self.foreign_after_sync = self.foreign_after_sync or self._synced\n            return\n",
        new="        if False:\n            return\n",
        tests=("tests/unit/runtime/test_two_engines.py",),
    ),
    Mutation(
        name="non-finite-norm-applied",
        bug_class="a NaN/inf gradient goes into the optimizer in fp32/bf16 training",
        path="deepscale/runtime/precision/precision_optimizer.py",
        old="        overflow = not math.isfinite(norm)\n",
        new="        overflow = not math.isfinite(norm) and self.loss_scaler is not None\n",
        tests=("tests/unit/runtime/test_step_guards.py::test_nan_gradient_skips_step_at_every_precision",),
    ),
    Mutation(
        name="step-without-backward-applied",
        bug_class="engine.step() with no backward since the last step counts a step silently",
        path="deepscale/runtime/training_optimizer.py",
        old="        if not self._backward_since_step:\n",
        new="        if False:\n",
        tests=("tests/unit/runtime/test_step_guards.py",),
    ),
    Mutation(
        name="global-norm-not-reduced",
        bug_class="partitioned gradients' norm taken over the local shard only (clipping and skip decisions differ per rank)",
        path="deepscale/runtime/training_optimizer.py",
        old="        dist.all_reduce(squares, group=self.group)\n",
        new="",
        tests=(_SGD_PARITY,),
    ),
)
