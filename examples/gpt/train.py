"""Train the example GPT on synthetic Markov-chain data with the deepscale engine.

Run on two CPU processes (gloo):

    deepscale --num_procs 2 examples/gpt/train.py --deepspeed_config examples/gpt/ds_config.json

The script is written against the DeepSpeed calling convention, so replacing ``deepscale``
with ``deepspeed`` in the import and the launcher command runs it under DeepSpeed.
"""
import argparse
import os
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
try:
    import deepscale
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(_HERE.parents[1]))
    import deepscale
import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(_HERE))
from data import MarkovChainDataset  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags: model sizes, run length and the engine's config flags."""
    parser = argparse.ArgumentParser(description="Train a small GPT with deepscale")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--num_samples", type=int, default=4096, help="sequences in the dataset")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the model weights")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the Markov chain")
    parser.add_argument("--save_dir", type=str, default=None,
                        help="if set, save a checkpoint here after the last step")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the launcher")
    try:
        add_config_arguments = deepscale.add_config_arguments
    except (AttributeError, ImportError):
        add_config_arguments = None
    if add_config_arguments is not None:
        parser = add_config_arguments(parser)
    else:  # checkouts without the launcher's helper: the two flags it adds
        group = parser.add_argument_group("deepscale")
        group.add_argument("--deepspeed", action="store_true", help="enable the engine")
        group.add_argument("--deepspeed_config", type=str, default=None, help="JSON config path")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    return args


def endless(loader):
    """Yield batches from ``loader`` forever, starting a new epoch when one ends."""
    epoch = 0
    while True:
        sampler = getattr(loader, "data_sampler", None) or getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(args: argparse.Namespace) -> dict:
    """Build the model and data, train for ``args.steps`` optimizer steps; return a summary."""
    deepscale.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # same initial weights on every rank
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                    vocab_size=args.vocab_size, seq_len=args.seq_len, dropout=args.dropout)
    model = GPT(cfg)
    dataset = MarkovChainDataset(num_samples=args.num_samples, seq_len=args.seq_len,
                                 vocab_size=args.vocab_size, seed=args.data_seed)
    engine, _, loader, _ = deepscale.initialize(args=args, model=model,
                                                model_parameters=model.parameters(),
                                                training_data=dataset)
    samples_per_step = (engine.train_micro_batch_size_per_gpu()
                        * engine.gradient_accumulation_steps() * world)
    if rank == 0:
        print(f"GPT with {model.num_parameters() / 1e6:.2f}M parameters, {world} processes, "
              f"{samples_per_step} samples/step, entropy floor ~{dataset.entropy_rate():.2f}",
              flush=True)
    return _loop(args, engine, loader, samples_per_step, rank)


def _loop(args, engine, loader, samples_per_step: int, rank: int) -> dict:
    """The training loop proper, with a rank-0 progress bar."""
    bar = tqdm(total=args.steps, disable=rank != 0, desc="train", dynamic_ncols=True)
    batches = endless(loader)
    first_loss = loss_value = None
    start = time.perf_counter()
    timed_from = None  # the first step includes one-off costs, so rates start after it
    while engine.global_steps < args.steps:
        step_before = engine.global_steps
        loss = engine(_to_device(next(batches), engine.device))
        engine.backward(loss)
        engine.step()
        if engine.global_steps == step_before:
            continue  # inside a gradient-accumulation window
        loss_value = loss.item()
        first_loss = loss_value if first_loss is None else first_loss
        if timed_from is None:
            timed_from = (time.perf_counter(), engine.global_steps)
        bar.update(engine.global_steps - step_before)
        rate = _rates(timed_from, engine.global_steps, samples_per_step, args.seq_len)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{engine.get_lr()[0]:.2e}",
                        tok_s=f"{rate[0]:.0f}", samples_s=f"{rate[1]:.1f}")
    bar.close()
    tokens_s, samples_s = _rates(timed_from, engine.global_steps, samples_per_step, args.seq_len)
    final_loss = _mean_over_ranks(loss_value)
    summary = {"steps": engine.global_steps, "first_loss": first_loss, "final_loss": final_loss,
               "tokens_per_s": tokens_s, "samples_per_s": samples_s,
               "wall_s": time.perf_counter() - start}
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)
    if rank == 0:
        print(f"done: {summary['steps']} steps in {summary['wall_s']:.1f}s, loss "
              f"{first_loss:.3f} -> {final_loss:.3f}, {tokens_s:.0f} tokens/s, "
              f"{samples_s:.1f} samples/s" + (f", checkpoint in {args.save_dir}"
                                              if args.save_dir else ""), flush=True)
    return summary


def _to_device(batch: dict, device) -> dict:
    """Move the batch to the engine's device (the engine, like DeepSpeed's, does not)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _rates(timed_from, steps: int, samples_per_step: int, seq_len: int):
    """(tokens/s, samples/s) over the steps after the first one; zeros until there are any."""
    elapsed = time.perf_counter() - timed_from[0]
    done = steps - timed_from[1]
    if done <= 0 or elapsed <= 0:
        return 0.0, 0.0
    samples_s = done * samples_per_step / elapsed
    return samples_s * seq_len, samples_s


def _mean_over_ranks(value: float) -> float:
    """Average a Python float over all ranks (the progress bar shows rank 0's only)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def main(argv=None) -> dict:
    """Entry point: parse flags and train."""
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
