"""Small models, data and a reference training loop shared by the engine tests."""
import torch
import torch.nn.functional as F

IN_DIM, HIDDEN, OUT_DIM = 16, 32, 4


class TinyNet(torch.nn.Module):
    """A 3-layer MLP returning the MSE loss; ``frozen=True`` freezes the first layer."""

    def __init__(self, frozen: bool = False, unused: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN),
                                           torch.nn.Linear(HIDDEN, OUT_DIM)])
        self.extra = torch.nn.Linear(OUT_DIM, OUT_DIM) if unused else None
        if frozen:
            for p in self.layers[0].parameters():
                p.requires_grad_(False)

    def forward(self, x, y, use_extra: bool = False):
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.dropout(torch.tanh(h))
        if use_extra and self.extra is not None:
            h = self.extra(h)
        return F.mse_loss(h.float(), y.float())


def make_model(seed: int = 1234, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def global_batch(step: int, batch_size: int):
    """The deterministic global batch of ``step`` (same on every rank)."""
    gen = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(batch_size, IN_DIM, generator=gen)
    y = torch.randn(batch_size, OUT_DIM, generator=gen)
    return x, y


def rank_micro_batch(step: int, micro: int, rank: int, micro_bs: int, gas: int, world: int):
    """The slice of the global batch that ``rank`` consumes at micro-step ``micro``."""
    x, y = global_batch(step, micro_bs * gas * world)
    start = (micro * world + rank) * micro_bs
    return x[start:start + micro_bs], y[start:start + micro_bs]


def train_steps(engine, steps, micro_bs: int, world: int):
    """Train ``engine`` on the global batches of ``steps`` (one micro-batch each); returns the losses."""
    import torch.distributed as dist
    losses = []
    for step in steps:
        x, y = rank_micro_batch(step, 0, dist.get_rank(), micro_bs, 1, world)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def base_config(micro_bs: int = 2, gas: int = 1, world: int = 1, **extra) -> dict:
    cfg = {
        "train_batch_size": micro_bs * gas * world,
        "train_micro_batch_size_per_gpu": micro_bs,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 1000,
        # reference_run clips only when asked; DeepSpeed's (and our) default is 1.0.
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "betas": [0.9, 0.99]}},
    }
    cfg.update(extra)
    return cfg


def reference_run(num_steps: int, batch_size: int, clip: float = 0.0, **model_kwargs):
    """Single-process plain-PyTorch training over the same global batches; returns (losses, params)."""
    model = make_model(**model_kwargs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01,
                            betas=(0.9, 0.99))
    losses = []
    for step in range(num_steps):
        x, y = global_batch(step, batch_size)
        loss = model(x, y)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
