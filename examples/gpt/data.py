"""Synthetic, learnable token data for the GPT example: nothing is downloaded.

Sequences are walks on a fixed random sparse Markov chain: every token has a handful of
possible successors with skewed probabilities. A model that learns the transition table
reaches a loss near the chain's entropy rate, far below the ``log(vocab_size)`` of an
untrained model, so the loss curve falls visibly within a few dozen steps.
"""
import torch
from torch.utils.data import Dataset


class MarkovChainDataset(Dataset):
    """Token sequences drawn from a seeded sparse Markov chain.

    Each item is a dict ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}``
    where ``labels`` is ``input_ids`` shifted left by one (next-token targets).
    The same arguments always give the same data, on every rank and every run.

    Args:
        num_samples: number of sequences. Default 4096.
        seq_len: tokens per sequence. Default 128.
        vocab_size: number of token ids. Default 2048.
        num_successors: possible next tokens per token (sparsity of the chain). Default 4.
        seed: seed of the chain and of the walks. Default 0.
    """

    def __init__(self, num_samples: int = 4096, seq_len: int = 128, vocab_size: int = 2048,
                 num_successors: int = 4, seed: int = 0):
        for name, value in (("num_samples", num_samples), ("seq_len", seq_len),
                            ("vocab_size", vocab_size), ("num_successors", num_successors)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MarkovChainDataset {name} must be a positive int, got {value!r}")
        if num_successors > vocab_size:
            raise ValueError(f"MarkovChainDataset num_successors ({num_successors}) must be "
                             f"<= vocab_size ({vocab_size})")
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        gen = torch.Generator().manual_seed(seed)
        # successors[t] lists the tokens that may follow t; probs[t] their probabilities.
        self.successors = torch.randint(0, vocab_size, (vocab_size, num_successors), generator=gen)
        weights = torch.rand(vocab_size, num_successors, generator=gen) ** 3 + 1e-3
        self.probs = weights / weights.sum(dim=1, keepdim=True)
        self.tokens = self._walk(num_samples, seq_len + 1, gen)

    def _walk(self, num_samples: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """Sample ``num_samples`` walks of ``length`` tokens, all walks advanced together."""
        tokens = torch.empty(num_samples, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (num_samples,), generator=gen)
        for t in range(1, length):
            prev = tokens[:, t - 1]
            choice = torch.multinomial(self.probs[prev], 1, generator=gen).squeeze(1)
            tokens[:, t] = self.successors[prev, choice]
        return tokens

    def entropy_rate(self) -> float:
        """Mean per-token entropy (nats) of the transitions: roughly the lowest reachable loss.

        Averaged uniformly over tokens, which approximates the chain's stationary average.
        """
        p = self.probs
        return float(-(p * p.log()).sum(dim=1).mean())

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict:
        row = self.tokens[index]
        return {"input_ids": row[:-1], "labels": row[1:]}
