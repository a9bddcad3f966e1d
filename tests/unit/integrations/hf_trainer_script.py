"""Train a tiny GPT-2 with the Hugging Face Trainer and a DeepSpeed config ("auto" values), through
the ``deepspeed`` compatibility shim. Launched by test_hf_trainer.py under ``deepscale --num_procs 2``.

Usage: hf_trainer_script.py --stage {2,3} --out DIR --result FILE [--hf_optimizer]
Runs 10 steps (checkpoints at steps 5 and 10), then, in the same processes, a fresh Trainer that
resumes from the step-5 checkpoint. Rank 0 writes FILE (JSON) with, for each run: the logged loss
of every step, the global step, engine facts and a checksum of the weights ``save_model`` wrote.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_common import TokenDataset, allow_deepspeed_on_cpu, ds_config, tiny_gpt2, write_json  # noqa: E402


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def train(stage: int, out: str, resume=None, hf_optimizer: bool = False) -> dict:
    """One Trainer run of 10 steps (checkpoints at 5 and 10), or its continuation from ``resume``."""
    training_args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=10,
        learning_rate=3e-3, warmup_steps=2, logging_steps=1, save_steps=5, save_strategy="steps",
        report_to=[], deepspeed=ds_config(stage, hf_optimizer), seed=0, dataloader_num_workers=0, disable_tqdm=True)
    model = tiny_gpt2()  # after TrainingArguments: under ZeRO-3 this runs inside deepspeed.zero.Init
    partitioned_at_build = any(hasattr(p, "ds_id") for p in model.parameters())
    recorder = LossRecorder()
    trainer = Trainer(model=model, args=training_args, train_dataset=TokenDataset(), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume)

    eval_loss = trainer.evaluate(TokenDataset(num_samples=8, seed=1))["eval_loss"]

    import deepspeed
    engine = trainer.model_wrapped
    result = {
        "losses": {str(k): v for k, v in sorted(recorder.losses.items())},
        "global_step": trainer.state.global_step,
        "engine_global_steps": engine.global_steps,
        "is_engine": isinstance(engine, deepspeed.DeepSpeedEngine),
        "config_stage": engine.config.get("zero_optimization", {}).get("stage"),
        "micro_batch": engine.train_micro_batch_size_per_gpu(),
        "lr": engine.get_lr()[0],
        "partitioned_at_build": partitioned_at_build,
        "eval_loss": eval_loss,
    }
    final = os.path.join(out, "final")
    trainer.save_model(final)
    if trainer.args.process_index == 0:
        weights = _load_saved_weights(final)
        result["saved_weight_sum"] = float(sum(t.double().abs().sum() for t in weights.values()))
        result["saved_weight_keys"] = len(weights)
        result["saved_full_shapes"] = all(t.numel() > 0 for t in weights.values())
        # deepspeed.utils.zero_to_fp32 on the Trainer's last checkpoint gives the same weights.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        fp32 = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "checkpoint-10"))
        common = [k for k in weights if k in fp32]
        result["zero_to_fp32_keys"] = len(common)
        result["zero_to_fp32_matches"] = all(torch.allclose(fp32[k], weights[k].float()) for k in common)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--hf_optimizer", action="store_true", help="no optimizer/scheduler in the DeepSpeed config")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    allow_deepspeed_on_cpu()
    first = train(args.stage, os.path.join(args.out, "run"), hf_optimizer=args.hf_optimizer)
    resumed = train(args.stage, os.path.join(args.out, "resumed"),
                    resume=os.path.join(args.out, "run", "checkpoint-5"), hf_optimizer=args.hf_optimizer)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(args.result, {"first": first, "resumed": resumed})


def _load_saved_weights(folder):
    safe = os.path.join(folder, "model.safetensors")
    if os.path.isfile(safe):
        from safetensors.torch import load_file
        return load_file(safe)
    return torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu")


if __name__ == "__main__":
    main()
