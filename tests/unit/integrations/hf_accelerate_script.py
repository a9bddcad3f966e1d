"""Train a tiny GPT-2 with a plain Accelerate loop on the DeepSpeed plugin, through the ``deepspeed``
compatibility shim. Launched by test_hf_accelerate.py under ``accelerate launch --config_file``.

Usage: hf_accelerate_script.py --result FILE --ckpt DIR
First 10 optimizer steps with ``accelerator.save_state(DIR)`` after step 5; then, in the same
processes, a fresh Accelerator that ``load_state(DIR)``s, skips the batches already seen and runs
steps 6-10. Rank 0 writes FILE (JSON) with, for each run: the mean loss of every optimizer step
and facts about the engine and the state dict ``accelerator.get_state_dict`` gathers.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from hf_common import TokenDataset, allow_deepspeed_on_cpu, tiny_gpt2, write_json  # noqa: E402

STEPS, SAVE_AT = 10, 5


def train(ckpt: str, resume: bool) -> dict:
    """10 optimizer steps saving state after step 5, or steps 6-10 after loading that state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DummyOptim, DummyScheduler, set_seed

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator for each run
    accelerator = Accelerator()
    set_seed(0)
    model = tiny_gpt2()
    partitioned_at_build = any(hasattr(p, "ds_id") for p in model.parameters())
    loader = torch.utils.data.DataLoader(TokenDataset(num_samples=96), batch_size=2, shuffle=False)
    optimizer = DummyOptim(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = DummyScheduler(optimizer, warmup_num_steps=2)
    engine, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    gas = accelerator.gradient_accumulation_steps

    step = 0
    if resume:
        accelerator.load_state(ckpt)
        step = SAVE_AT
        loader = accelerator.skip_first_batches(loader, SAVE_AT * gas)
    losses, window = {}, []
    engine.train()
    for batch in loader:
        with accelerator.accumulate(engine):
            loss = engine(**batch).loss
            accelerator.backward(loss)
            window.append(loss.item())
            if accelerator.sync_gradients:
                step += 1
                losses[str(step)] = sum(window) / len(window)
                window = []
                if step == SAVE_AT and not resume:
                    accelerator.save_state(ckpt)
        if step == STEPS:
            break

    import deepspeed
    state = accelerator.get_state_dict(engine)
    result = {"losses": losses, "engine_global_steps": engine.global_steps, "gas": gas,
              "is_engine": isinstance(engine, deepspeed.DeepSpeedEngine),
              "unwrapped_is_model": accelerator.unwrap_model(engine) is engine.module,
              "was_step_applied": engine.was_step_applied(), "partitioned_at_build": partitioned_at_build}
    if accelerator.is_main_process:
        result["state_dict_keys"] = len(state)
        result["state_dict_sum"] = float(sum(t.double().abs().sum() for t in state.values()))
        result["state_dict_full_shapes"] = all(t.numel() > 0 for t in state.values())
    accelerator.wait_for_everyone()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", required=True)
    parser.add_argument("--ckpt", required=True)
    args = parser.parse_args()
    allow_deepspeed_on_cpu()
    first = train(args.ckpt, resume=False)
    resumed = train(args.ckpt, resume=True)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(args.result, {"first": first, "resumed": resumed})


if __name__ == "__main__":
    main()
