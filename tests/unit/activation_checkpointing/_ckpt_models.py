"""Models for the activation checkpointing tests: dropout, a frozen layer and a linear layer
shared by a checkpointed block and the code outside it."""
import torch
import torch.nn.functional as F

DIM = 16


class Block(torch.nn.Module):
    def __init__(self, dim: int, shared: torch.nn.Module = None, p: float = 0.2):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, 2 * dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)
        self.drop = torch.nn.Dropout(p)
        self.shared = shared  # registered here and at the root: one parameter, two users

    def forward(self, x, scale: float = 1.0, extra=None):
        h = self.drop(F.gelu(self.fc1(x)))
        out = x + self.fc2(h) * scale
        if self.shared is not None:
            out = out + torch.tanh(self.shared(out))
        if extra is not None:
            out = out + extra["bias"]
        return out


class Net(torch.nn.Module):
    """``mode``: None, "reentrant" or "non_reentrant" (deepscale.checkpointing)."""

    def __init__(self, mode=None, layers: int = 3, dim: int = DIM, frozen: bool = True):
        super().__init__()
        self.shared = torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList(
            [Block(dim, shared=self.shared if i == 1 else None) for i in range(layers)])
        self.head = torch.nn.Linear(dim, 1)
        self.mode = mode
        if frozen:
            for param in self.blocks[0].fc1.parameters():
                param.requires_grad_(False)

    def forward(self, x, y):
        import deepscale.checkpointing as ckpt
        for block in self.blocks:
            if self.mode == "reentrant":
                x = ckpt.checkpoint(block, x)
            elif self.mode == "reentrant_closure":  # Megatron style: a function calling layers
                x = ckpt.checkpoint(lambda t, b=block: b(t), x)
            elif self.mode == "non_reentrant":
                x = ckpt.non_reentrant_checkpoint(block, x)
            else:
                x = block(x)
        x = self.shared(x)  # the shared layer again, outside every checkpoint
        return F.mse_loss(self.head(x).squeeze(-1), y)


def make_net(mode=None, seed: int = 3, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(mode, **kwargs)


def batch(step: int, rank: int, size: int = 4, dim: int = DIM):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(size, dim, generator=gen), torch.randn(size, generator=gen)


class spy_frames:
    """Context that records every checkpoint call (reentrant or not) created inside it."""

    def __enter__(self):
        from deepscale.runtime.activation_checkpointing.call_state import CallState
        self.frames, self._cls, self._orig = [], CallState, CallState.__init__
        frames, orig = self.frames, self._orig

        def spy(frame, *args, **kwargs):
            orig(frame, *args, **kwargs)
            frames.append(frame)

        self._cls.__init__ = spy
        return self.frames

    def __exit__(self, *exc):
        self._cls.__init__ = self._orig
        return False
