"""Layers, data and a single-process reference loop shared by the pipeline tests."""
import torch
import torch.nn.functional as F

WIDTH, OUT = 8, 4
VOCAB = 11


class Block(torch.nn.Module):
    """``tanh(Linear(x))``; with ``passthrough`` it takes and returns ``(x, mask)`` (a non-grad tensor
    crossing stages)."""

    def __init__(self, width: int = WIDTH, passthrough: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.passthrough = passthrough

    def forward(self, x):
        if self.passthrough:
            h, mask = x
            return torch.tanh(self.linear(h)) * mask, mask
        return torch.tanh(self.linear(x))


class Head(torch.nn.Module):
    def __init__(self, passthrough: bool = False):
        super().__init__()
        self.linear = torch.nn.Linear(WIDTH, OUT)
        self.passthrough = passthrough

    def forward(self, x):
        return self.linear(x[0] if self.passthrough else x)


class Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(VOCAB, WIDTH) * 0.3)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class View(torch.nn.Module):
    """Returns a view of its input (a stage boundary whose output is a view)."""

    def forward(self, x):
        return x.view(x.shape[0], -1)


def lm_head(embed: Embed, x):
    return x @ embed.weight.t()


def mse(outputs, labels):
    return F.mse_loss(outputs.float(), labels.float())


def xent(outputs, labels):
    return F.cross_entropy(outputs.reshape(-1, VOCAB).float(), labels.reshape(-1))


def layer_specs(num_blocks: int, passthrough: bool = False, tied: bool = False):
    """The layers as specs; ``tied`` gives an LM: tied embedding, blocks, LM head sharing the embedding."""
    from deepscale.pipe import LayerSpec, TiedLayerSpec
    if tied:
        return ([TiedLayerSpec("embed", Embed)] + [LayerSpec(Block) for _ in range(num_blocks)]
                + [TiedLayerSpec("embed", Embed, forward_fn=lm_head)])
    return [LayerSpec(Block, passthrough=passthrough) for _ in range(num_blocks)] + [LayerSpec(Head, passthrough)]


def micro_batch(step: int, index: int, micro_bs: int = 3, passthrough: bool = False, tied: bool = False):
    """Deterministic micro-batch ``index`` of global step ``step``."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    if tied:
        ids = torch.randint(0, VOCAB, (micro_bs, 5), generator=gen)
        return ids, torch.randint(0, VOCAB, (micro_bs, 5), generator=gen)
    x = torch.randn(micro_bs, WIDTH, generator=gen)
    y = torch.randn(micro_bs, OUT, generator=gen)
    if passthrough:
        mask = (torch.rand(micro_bs, WIDTH, generator=gen) > 0.2).float()
        return (x, mask), y
    return x, y


def rank_iterator(step: int, gas: int, dp_rank: int, dp: int, **kw):
    """The micro-batches replica ``dp_rank`` reads at ``step`` (global index ``k * dp + dp_rank``)."""
    return iter([micro_batch(step, k * dp + dp_rank, **kw) for k in range(gas)])


def build_reference(specs, base_seed: int = 1234):
    """The same layers in one process, seeded as ``PipelineModule(seed_layers=True)`` seeds them."""
    from deepscale.pipe import TiedLayerSpec
    funcs, modules, tied = [], torch.nn.ModuleList(), {}
    for index, spec in enumerate(specs):
        torch.manual_seed(base_seed + index)
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
                modules.append(tied[spec.key])
            module = tied[spec.key]
            funcs.append((lambda m, f: (lambda x: f(m, x)))(module, spec.forward_fn) if spec.forward_fn else module)
        else:
            module = spec.build()
            modules.append(module)
            funcs.append(module)
    return funcs, modules


def reference_training(specs, steps: int, gas: int, dp: int, loss_fn, lr: float = 0.1, optimizer: str = "sgd",
                       clip: float = 0.0, **data_kw):
    """Losses per step and final parameters of plain single-process training on all micro-batches."""
    funcs, modules = build_reference(specs)
    params = list(modules.parameters())
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr))
    losses = []
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        count = gas * dp
        for index in range(count):
            x, y = micro_batch(step, index, **data_kw)
            for f in funcs:
                x = f(x)
            loss = loss_fn(x, y)
            (loss / count).backward()
            total += loss.item()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(total / count)
    return losses, modules


def reference_state(specs, modules):
    """The reference weights under the PipelineModule's state-dict names."""
    from deepscale.pipe import TiedLayerSpec
    out, position, seen = {}, 0, set()
    for index, spec in enumerate(specs):
        if isinstance(spec, TiedLayerSpec):
            if spec.key in seen:
                continue
            seen.add(spec.key)
            prefix = f"tied_modules.{spec.key}."
        else:
            prefix = f"{index}."
        for k, v in modules[position].state_dict().items():
            out[prefix + k] = v.clone()
        position += 1
    return out
