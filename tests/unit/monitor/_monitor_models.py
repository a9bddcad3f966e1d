"""A tiny token model (integer inputs, so tokens/s is written) shared by the monitor tests."""
import torch
import torch.nn.functional as F

VOCAB, SEQ, DIM = 50, 6, 8


class TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.head = torch.nn.Linear(DIM, 1)

    def forward(self, ids, y):
        return F.mse_loss(self.head(self.embed(ids).mean(dim=1)).squeeze(-1), y)


def token_batch(step: int, micro: int, rank: int, micro_bs: int):
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (micro_bs, SEQ), generator=gen), torch.randn(micro_bs, generator=gen)


def engine_config(micro_bs: int, gas: int, world: int, **extra) -> dict:
    cfg = {"train_batch_size": micro_bs * gas * world, "train_micro_batch_size_per_gpu": micro_bs,
           "gradient_accumulation_steps": gas, "steps_per_print": 1000,
           "optimizer": {"type": "SGD", "params": {"lr": 0.05}}}
    cfg.update(extra)
    return cfg
