"""With parameters on NVMe, a rank's peak resident memory does not grow with the model.

A stack of frozen 1024x1024 layers behind one trainable layer (so the optimizer state is the
same for both sizes and backward runs through every layer) is built under ``zero.Init`` at 8
and at 40 layers and trained for 3 steps on 2 ranks, with ``stage3_max_live_parameters`` of one
layer. Peak RSS during training is measured (``/proc/self/clear_refs`` resets the high-water
mark after setup; freed heap pages are trimmed first so the figure is live data). With
``offload_param.device='nvme'`` the two sizes' peaks differ by far less than their shards do
(64 MiB per rank), and each peak stays within the staging buffers plus a few layers; without
offload the same measurement grows with the shards, which shows the test can fail.
"""
import torch

from dist_harness import run_distributed
from _zero3_helpers import trim_heap

DIM, SMALL, BIG = 1024, 8, 40
LAYER_BYTES = DIM * DIM * 4
MIB = 2 ** 20


class FrozenStack(torch.nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.head = torch.nn.Linear(DIM, DIM)
        self.body = torch.nn.ModuleList([torch.nn.Linear(DIM, DIM, bias=False) for _ in range(layers)])
        for param in self.body.parameters():
            param.requires_grad_(False)

    def forward(self, x, y):
        h = self.head(x)
        for layer in self.body:
            h = torch.tanh(layer(h))
        return ((h - y) ** 2).mean()


def _rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS"))


def _peak() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM"))




def _measure(world, layers, device, nvme_path):
    import deepscale
    import deepscale.zero
    zero = {"stage": 3, "stage3_max_live_parameters": DIM * DIM, "stage3_prefetch_bucket_size": DIM * DIM,
            "reduce_bucket_size": DIM * DIM, "stage3_param_persistence_threshold": 2 * DIM}
    if device != "none":
        zero["offload_param"] = {"device": device, "nvme_path": nvme_path, "max_in_cpu": 0, "buffer_count": 2,
                                 "buffer_size": DIM * DIM // world}
    cfg = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "gradient_clipping": 1.0}
    trim_heap()
    base = _rss()
    torch.manual_seed(0)
    with deepscale.zero.Init():
        model = FrozenStack(layers)
    engine, _, _, _ = deepscale.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, DIM, generator=gen), torch.randn(4, DIM, generator=gen)) for _ in range(3)]
    trim_heap()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the high-water mark: what follows is training only
    losses = []
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    peak = _peak()
    engine.destroy()
    return {"base": base, "peak": peak, "losses": losses}


def _measure_sizes(world, device, nvme_path):
    # In one process, after a warm-up run that pays the one-time costs (op loading, thread
    # pools, allocator arenas), so that the absolute peaks of the two sizes compare.
    _measure(world, 2, device, nvme_path)
    return {layers: _measure(world, layers, device, nvme_path) for layers in (SMALL, BIG)}


def test_peak_rss_with_params_on_nvme_does_not_grow_with_the_model(tmp_path):
    world = 2
    shard_growth = (BIG - SMALL) * LAYER_BYTES // world  # 64 MiB per rank
    nvme = run_distributed(_measure_sizes, world, args=(world, "nvme", str(tmp_path)))
    plain = run_distributed(_measure_sizes, world, args=(world, "none", str(tmp_path)))
    for rank in range(world):
        small, big = nvme[rank][SMALL], nvme[rank][BIG]
        growth = big["peak"] - small["peak"]
        assert growth < shard_growth / 4, f"rank {rank}: peak grew {growth / MIB:.1f} MiB with the model"
        # staging buffers (2 x one layer's shard) + the gathered layer, its gradient and the
        # reduce-scatter buffer of the trainable layer (3 layers) + its fp32 master, gradient
        # and Adam moments (2 layers' shards) + 40 MiB for what the engine itself holds (hooks,
        # I/O rings, op state), the activations and the allocator: measured 51 MiB in all
        bound = 2 * LAYER_BYTES // world + 3 * LAYER_BYTES + 4 * LAYER_BYTES // world + 40 * MIB
        for run in (small, big):
            assert run["peak"] - run["base"] <= bound, (
                f"rank {rank}: {(run['peak'] - run['base']) / MIB:.1f} MiB above the bound {bound / MIB:.1f} MiB")
            assert all(torch.isfinite(torch.tensor(run["losses"])))
        control = plain[rank][BIG]["peak"] - plain[rank][SMALL]["peak"]
        assert control > shard_growth * 0.75, f"without offload the peak grew only {control / MIB:.1f} MiB"
