"""Shared pieces of the Hugging Face integration scripts: a tiny GPT-2 built from a config
(random weights, nothing downloaded), synthetic token data and a DeepSpeed config with "auto"
values. Imported by the scripts the tests launch, not collected by pytest."""
import json
import os

import torch

VOCAB, SEQ, SAMPLES = 128, 16, 64


def tiny_gpt2():
    """A 2-layer GPT-2 from a config, built the way Trainer users do (``from_config``), so under
    ZeRO-3 it goes through ``deepspeed.zero.Init``."""
    from transformers import AutoModelForCausalLM, GPT2Config
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)


class TokenDataset(torch.utils.data.Dataset):
    """Sequences of a fixed random walk over the vocabulary: learnable (next token = previous + small step)."""

    def __init__(self, num_samples: int = SAMPLES, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (num_samples, 1), generator=gen)
        steps = torch.randint(1, 3, (num_samples, SEQ - 1), generator=gen)
        self.tokens = torch.cat([start, start + steps.cumsum(1)], dim=1) % VOCAB

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def ds_config(stage: int, hf_optimizer: bool = False) -> dict:
    """A DeepSpeed config as Trainer users write it: batch sizes, optimizer and schedule "auto".

    With ``hf_optimizer`` the config has no optimizer and scheduler sections, so the Trainer
    creates its own (AdamW and its linear schedule) and hands them to the engine."""
    zero = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto"}},
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1000,
    }
    if hf_optimizer:
        del config["optimizer"], config["scheduler"]
    return config


def allow_deepspeed_on_cpu() -> None:
    """Let Accelerate run its DeepSpeed path on a machine without an accelerator.

    Accelerate (1.16) picks the process-group backend from the accelerator device; with none it
    sets no backend and counts one process even when the launcher started several, and it only
    enables DeepSpeed when not on CPU. With a GPU this function changes nothing. On CPU it makes
    Accelerate pick gloo, which is what DeepSpeed (and deepscale) use there.
    """
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.accelerator.current_accelerator() is not None:
        return
    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, distributed_type

    PartialState._prepare_backend = prepare_backend


def accelerate_ds_config(stage: int) -> dict:
    """A DeepSpeed config as Accelerate users write it: the values Accelerate fills are "auto"."""
    zero = {"stage": stage, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.999],
                                                   "eps": 1e-8}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto"}},
        "zero_optimization": zero,
    }


def write_accelerate_config(path: str, ds_config_path: str, num_processes: int, port: int, zero3_init: bool):
    """An ``accelerate launch --config_file`` YAML selecting the DeepSpeed plugin with ``ds_config_path``."""
    lines = ["compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED", "deepspeed_config:",
             f"  deepspeed_config_file: {ds_config_path}", f"  zero3_init_flag: {str(zero3_init).lower()}",
             "machine_rank: 0", "num_machines: 1", f"num_processes: {num_processes}",
             f"main_process_port: {port}", "main_training_function: main", "use_cpu: false"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def write_json(path: str, obj) -> None:
    with open(path, "w") as handle:
        json.dump(obj, handle)
