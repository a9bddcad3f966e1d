"""Layers, data, a single-process reference and engine builders shared by the 3D (TP x PP x DP) tests."""
import torch

RTOL, ATOL = 1e-5, 1e-6
STEPS, LR, MOMENTUM, CLIP = 5, 0.1, 0.9, 0.3
WIDTH, OUT, MICRO, GAS = 8, 3, 2, 2
TP, PP, DP = 2, 2, 2


class TPBlock(torch.nn.Module):
    """``x + proj(tanh(fc(norm(x))))``: column- then row-parallel under a tensor-parallel group,
    plain ``nn.Linear`` layers when ``dense``."""

    def __init__(self, tp_group=None, dense: bool = False):
        super().__init__()
        from deepscale.parallel import ColumnParallelLinear, RowParallelLinear
        self.norm = torch.nn.LayerNorm(WIDTH)
        if dense:
            self.fc, self.proj = torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.Linear(2 * WIDTH, WIDTH)
        else:
            self.fc = ColumnParallelLinear(WIDTH, 2 * WIDTH, tp_group=tp_group)
            self.proj = RowParallelLinear(2 * WIDTH, WIDTH, tp_group=tp_group)

    def forward(self, x):
        return x + self.proj(torch.tanh(self.fc(self.norm(x))))


def mse(outputs, labels):
    return torch.nn.functional.mse_loss(outputs, labels)


def layer_specs(tp_group=None, dense: bool = False):
    from deepscale.pipe import LayerSpec
    return [LayerSpec(TPBlock, tp_group, dense) for _ in range(3)] + [LayerSpec(torch.nn.Linear, WIDTH, OUT)]


def dense_reference():
    """The dense layers with fixed weights (identical in every process)."""
    torch.manual_seed(7)
    return torch.nn.Sequential(*[spec.build() for spec in layer_specs(dense=True)])


def step_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    rows = MICRO * GAS * DP
    return torch.randn(rows, WIDTH, generator=g), torch.randn(rows, OUT, generator=g)


def rank_iterator(step: int, dp_rank: int, gas: int = GAS, batch_fn=None):
    """The micro-batches of data-parallel rank ``dp_rank`` (``gas`` of them) in step ``step``'s batch."""
    x, y = (batch_fn or step_batch)(step)
    for m in range(gas):
        lo = (dp_rank * gas + m) * MICRO
        yield x[lo:lo + MICRO], y[lo:lo + MICRO]


def train_reference(model, batch_fn, loss_fn, steps: int = STEPS):
    """SGD with momentum and clipping on one process: (losses, gradient norms, model)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses, norms = [], []
    for step in range(steps):
        inputs, labels = batch_fn(step)
        loss = loss_fn(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms, model


def reference_training(steps: int = STEPS):
    return train_reference(dense_reference(), step_batch, mse, steps)


class MegatronStyleMpu:
    """A user's model-parallel unit with Megatron's accessor names only (no deepscale grid)."""

    def __init__(self, rank: int, swap_dp_tp: bool = False):
        import torch.distributed as dist
        pp_of, dp_of, tp_of = (lambda r: r // (DP * TP)), (lambda r: (r // TP) % DP), (lambda r: r % TP)
        if swap_dp_tp:  # a layout that disagrees with the module's topology
            dp_of, tp_of = tp_of, dp_of
        self.coords = {"pp": pp_of(rank), "dp": dp_of(rank), "tp": tp_of(rank)}
        self.groups = {}
        for axis, of in (("pp", pp_of), ("dp", dp_of), ("tp", tp_of)):
            others = [o for a, o in (("pp", pp_of), ("dp", dp_of), ("tp", tp_of)) if a != axis]
            keyed = {}
            for r in range(PP * DP * TP):
                keyed.setdefault(tuple(o(r) for o in others), []).append(r)
            for ranks in keyed.values():
                group = dist.new_group(ranks=ranks)
                if rank in ranks:
                    self.groups[axis] = (group, len(ranks))

    def get_model_parallel_group(self):
        return self.groups["tp"][0]

    def get_model_parallel_world_size(self):
        return self.groups["tp"][1]

    def get_model_parallel_rank(self):
        return self.coords["tp"]

    def get_data_parallel_group(self):
        return self.groups["dp"][0]

    def get_data_parallel_world_size(self):
        return self.groups["dp"][1]

    def get_data_parallel_rank(self):
        return self.coords["dp"]

    def get_pipeline_model_parallel_group(self):
        return self.groups["pp"][0]

    def get_pipeline_model_parallel_world_size(self):
        return self.groups["pp"][1]

    def get_pipeline_model_parallel_rank(self):
        return self.coords["pp"]


def config(zero_stage: int, tp_in_config: bool):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "gradient_clipping": CLIP, "steps_per_print": 10**6,
           "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}},
           "zero_optimization": {"stage": zero_stage}}
    if tp_in_config:
        cfg["tensor_parallel"] = {"tp": {"tp_size": TP}}
    return cfg


def build_3d_engine(zero_stage: int, use_mpu: bool):
    """The 3D pipeline engine over the dense reference's weights (every rank of the 8 calls it)."""
    import torch.distributed as dist
    import deepscale
    from deepscale.parallel import build_parallel_grid, reset_parallel_grid
    from deepscale.parallel.state_dict import shard_state_dict
    from deepscale.pipe import PipeModelDataParallelTopology, PipelineModule
    reset_parallel_grid()
    topology = PipeModelDataParallelTopology(num_pp=PP, num_mp=TP, num_dp=DP)
    if use_mpu:
        mpu = MegatronStyleMpu(dist.get_rank())
        tp_group = mpu.get_model_parallel_group()
    else:  # the grid of the layout, registered, so initialize() finds it (no mpu argument)
        mpu, tp_group = None, build_parallel_grid(tp=TP, pp=PP).get_model_parallel_group()
    model = PipelineModule(layer_specs(tp_group), topology=topology, loss_fn=mse, partition_method="uniform")
    local = model.state_dict()
    whole = {k: v for k, v in dense_reference().state_dict().items() if k in local}
    model.load_state_dict(shard_state_dict(model, whole), strict=True)
    engine, *_ = deepscale.initialize(model=model, config=config(zero_stage, not use_mpu), mpu=mpu)
    return engine


# --- a tied language model: vocabulary-parallel embedding shared with the LM head across stages ---
VOCAB, SEQ = 12, 3


def lm_head(embedding, x):
    """Logits of this rank's vocabulary slice from the (tied) embedding weight."""
    from deepscale.parallel.mappings import copy_to_region
    return torch.nn.functional.linear(copy_to_region(x, embedding.tp_group), embedding.weight)


def vocab_parallel_loss(logits, labels, tp_group, vocab_start):
    from deepscale.parallel import vocab_parallel_cross_entropy
    return vocab_parallel_cross_entropy(logits, labels, tp_group, vocab_start, reduction="mean")


def tied_lm_specs(tp_group):
    from deepscale.parallel import VocabParallelEmbedding
    from deepscale.pipe import LayerSpec, TiedLayerSpec
    return ([TiedLayerSpec("embed", VocabParallelEmbedding, VOCAB, WIDTH, tp_group=tp_group)]
            + [LayerSpec(TPBlock, tp_group) for _ in range(2)]
            + [TiedLayerSpec("embed", VocabParallelEmbedding, VOCAB, WIDTH, tp_group=tp_group, forward_fn=lm_head)])


class DenseTiedLM(torch.nn.Module):
    """The tied LM on one process, its state-dict names those of the PipelineModule."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.tied_modules = torch.nn.ModuleDict({"embed": torch.nn.Embedding(VOCAB, WIDTH)})
        self.add_module("1", TPBlock(dense=True))
        self.add_module("2", TPBlock(dense=True))

    def forward(self, ids):
        weight = self.tied_modules["embed"].weight
        x = self._modules["2"](self._modules["1"](torch.nn.functional.embedding(ids, weight)))
        return x @ weight.t()


def lm_batch(step: int):
    g = torch.Generator().manual_seed(200 + step)
    ids = torch.randint(0, VOCAB, (MICRO * GAS * DP, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def lm_rank_iterator(step: int, dp_rank: int):
    return rank_iterator(step, dp_rank, batch_fn=lm_batch)


def lm_reference_training(steps: int = STEPS):
    def xent(logits, labels):
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    return train_reference(DenseTiedLM(), lm_batch, xent, steps)
