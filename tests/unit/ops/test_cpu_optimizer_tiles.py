"""The compiled CPU optimizers on tensors larger than one tile.

The kernels (csrc/cpu_optim/optim_driver.h) cut every tensor into tiles of ``kTileElems``
elements, run a SIMD body and a scalar tail per tile, and hand runs of tiles to OpenMP
threads. An element at a tile edge that is updated twice, or not at all, only shows on a
tensor that spans several tiles, with lengths that are not multiples of the tile or the
vector width; these tests use such tensors, one and two threads, against torch's optimizers
(Lion: the float64 reference of the numerics tests).
"""
import re

import pytest
import torch

from _ops_test_helpers import REPO_ROOT
from deepscale.ops.adagrad import DeepScaleCPUAdagrad
from deepscale.ops.adam import DeepScaleCPUAdam
from deepscale.ops.lion import DeepScaleCPULion
from test_cpu_optimizer_numerics import Float64Lion


def _tile_elems():
    text = (REPO_ROOT / "csrc" / "cpu_optim" / "optim_driver.h").read_text()
    match = re.search(r"kTileElems\s*=\s*1\s*<<\s*(\d+)\s*;", text)
    assert match, "kTileElems not found in optim_driver.h: update this test with the new tile size"
    return 1 << int(match.group(1))


TILE = _tile_elems()
# Several tiles plus a tail that is no multiple of any vector width; one short of, one past
# and exactly two tiles; the slots follow each other, so tile edges also meet slot edges.
SIZES = (3 * TILE + 17, TILE - 1, TILE + 1, 2 * TILE, 5)
STEPS = 3


def _pair(kind, ours, ref, threads):
    if kind == "adamw":
        return (DeepScaleCPUAdam(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, adamw_mode=True,
                                 num_threads=threads),
                torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1))
    if kind == "adam":
        return (DeepScaleCPUAdam(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, adamw_mode=False,
                                 num_threads=threads),
                torch.optim.Adam(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1))
    if kind == "adagrad":
        return (DeepScaleCPUAdagrad(ours, lr=1e-2, eps=1e-10, weight_decay=0.1, num_threads=threads),
                torch.optim.Adagrad(ref, lr=1e-2, eps=1e-10, weight_decay=0.1))
    return (DeepScaleCPULion(ours, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, num_threads=threads),
            Float64Lion(ref, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["adamw", "adam", "adagrad", "lion"])
def test_every_element_across_tile_edges_is_updated_once(kind, threads):
    gen = torch.Generator().manual_seed(11)
    ref_dtype = torch.float64 if kind == "lion" else torch.float32
    init = [torch.randn(n, generator=gen) for n in SIZES]
    ours = [t.clone() for t in init]
    ref = [t.to(ref_dtype, copy=True) for t in init]
    opt, opt_ref = _pair(kind, ours, ref, threads)
    assert opt.uses_compiled_op, "the compiled op should build on this machine"
    for _ in range(STEPS):
        for o, r in zip(ours, ref):
            g = torch.randn(o.shape, generator=gen)
            o.grad, r.grad = g, g.to(ref_dtype)
        opt.step()
        opt_ref.step()
    for o, r, start in zip(ours, ref, init):
        # A double or missed update moves an element by about lr (1e-2 or 1e-3); fp32 rounding
        # of three steps stays below 1e-6.
        bad = ((o.double() - r.double()).abs() > 1e-6 + 1e-5 * r.double().abs()).nonzero().flatten()
        assert bad.numel() == 0, (f"{kind}, {threads} thread(s), tensor of {o.numel()} elements (tile {TILE}): "
                                  f"{bad.numel()} elements differ from the reference, first at {bad[:8].tolist()}")
        assert not torch.equal(o, start)
