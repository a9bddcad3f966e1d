"""FlopsProfiler and get_model_profile on one process: a GPT training step against the analytic
count and torch's FlopCounterMode, with and without activation checkpointing; tied weights; the
per-operator formulas; repeated profiles; and that nothing stays installed afterwards."""
import torch
import torch.nn.functional as F
import pytest
from torch.utils.flop_counter import FlopCounterMode

from deepscale.profiling.flops_profiler import (FlopsProfiler, get_model_profile, get_module_duration, get_module_flops,
                                               get_module_macs)
from deepscale.profiling.flops_profiler.units import (duration_to_string, flops_to_string, macs_to_string,
                                                      number_to_string, params_to_string)

from flops_gpt import CHECKPOINT_MODES, GPT, analytic_flops, batch_of

# d_model 256 keeps norms, activations and element-wise work (counted, but absent from the
# analytic 6 x params x tokens) under 0.5% of the step.
SHAPE = dict(vocab=512, d_model=256, num_layers=2, seq=64, batch=4)


def _gpt(**kwargs):
    torch.manual_seed(0)
    return GPT(**{k: v for k, v in SHAPE.items() if k != "batch"}, **kwargs)


def _profile_training_step(model, ids, labels):
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(ids, labels).backward()
    prof.stop_profile()
    return prof


@pytest.mark.parametrize("checkpoint", CHECKPOINT_MODES)
def test_training_step_matches_analytic_and_flop_counter_mode(checkpoint):
    model = _gpt(impl="manual", checkpoint=checkpoint)
    ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"])
    prof = _profile_training_step(model, ids, labels)
    phases = prof.get_flops_by_phase()
    with FlopCounterMode(display=False) as reference:
        model(ids, labels).backward()
    expected = analytic_flops(**SHAPE)

    # What FlopCounterMode counts (matmuls, attention), over everything that ran, recompute included.
    assert prof.get_training_flops() == reference.get_total_flops()
    # The model's training FLOPs (forward + backward) against 6 x params x tokens + attention; the
    # norms, activations and element-wise work the formula leaves out add well under 1%.
    assert prof.backward_profiled
    assert prof.get_training_flops(include_recompute=False) == pytest.approx(expected["train"], rel=0.01)
    with_other = prof.get_training_flops(include_recompute=False, include_other=True)
    assert 1.0 < with_other / expected["train"] < 1.01
    assert phases["forward"]["flops"] == pytest.approx(expected["forward"], rel=0.01)
    assert phases["forward"]["macs"] * 2 == phases["forward"]["flops"]
    if checkpoint == "none":
        assert phases["recompute"]["flops"] == 0
    elif checkpoint == "reentrant":  # the whole block forward runs again inside backward
        assert phases["recompute"]["flops"] == pytest.approx(expected["block_forward"], rel=0.01)
    else:  # non-reentrant stops recomputing once the saved tensors backward needs are rebuilt
        assert 0.5 * expected["block_forward"] < phases["recompute"]["flops"] < expected["block_forward"]
    assert prof.get_training_flops() == prof.get_training_flops(include_recompute=False) + phases["recompute"]["flops"]
    prof.end_profile()


def test_fused_attention_is_counted_on_cpu():
    # torch's FlopCounterMode has no formula for the CPU fused SDPA kernels (it reports 0 for them).
    model = _gpt(impl="sdpa")
    ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"])
    prof = _profile_training_step(model, ids, labels)
    expected = analytic_flops(**SHAPE)
    ops = prof.get_op_flops("forward")
    assert ops["_scaled_dot_product_flash_attention_for_cpu"] == expected["forward"] - 2 * expected[
        "matmul_params"] * SHAPE["batch"] * SHAPE["seq"]
    # torch's backward formula for fused attention includes the QK^T that flash recomputes (5 matmuls, not 4).
    assert prof.get_training_flops(include_recompute=False) == pytest.approx(expected["train_fused_attention"],
                                                                              rel=0.01)
    prof.end_profile()


class _TiedLM(torch.nn.Module):
    def __init__(self, vocab=100, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, ids):
        h = self.mix(self.mix(self.embed(ids)))  # the same Linear used twice
        return F.linear(h, self.embed.weight)  # the head reuses the embedding


def test_shared_weights_count_once_in_params_and_per_use_in_flops():
    model, ids = _TiedLM(), torch.randint(0, 100, (3, 5))
    flops, macs, params = get_model_profile(model, args=[ids], print_profile=False, as_string=False)
    tokens = 15
    assert params == 100 * 32 + 32 * 32
    assert macs == tokens * (2 * 32 * 32 + 32 * 100)
    assert flops == 2 * macs


def test_profiles_do_not_grow_across_steps():
    model = _gpt(impl="manual")
    ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"])
    prof = FlopsProfiler(model)
    seen = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)  # else backward also adds into the existing .grad (real work)
        prof.start_profile()
        model(ids, labels).backward()
        seen.append((prof.get_total_flops(), prof.get_training_flops(), prof.get_total_params()))
        prof.end_profile()
    prof.start_profile()
    model(ids, labels)
    prof.reset_profile()
    model(ids, labels)
    assert prof.get_total_flops() == seen[0][0]
    prof.end_profile()
    assert seen[0] == seen[1] == seen[2]


def _installed_state(model):
    return ([(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            {name: getattr(F, name) for name in dir(F)}, torch.matmul, torch.Tensor.matmul, torch.einsum,
            torch.Tensor.__matmul__, torch.bmm, torch.addmm, torch.baddbmm)


def test_nothing_stays_installed_after_the_profile():
    model = _gpt(impl="sdpa", checkpoint="reentrant")
    ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"])
    before = _installed_state(model)
    prof = FlopsProfiler(model)
    prof.start_profile()
    assert torch._C._len_torch_dispatch_stack() == 1
    model(ids, labels).backward()
    # DeepSpeed's attributes are live while profiling, and its readers see them.
    assert get_module_flops(model.blocks[0]) == prof.module_flops(model.blocks[0]) > 0
    assert get_module_macs(model) == prof.get_total_macs() and get_module_duration(model) > 0
    prof.stop_profile()
    assert torch._C._len_torch_dispatch_stack() == 0
    assert model.blocks[0].__flops__ == 0 and model.blocks[0].attn.qkv.__flops__ > 0  # own operators only
    assert model.__params__ == prof.get_total_params()
    prof.end_profile()
    assert _installed_state(model) == before
    assert not any(hasattr(m, "__flops__") or hasattr(m, "__duration__") for m in model.modules())


def test_an_exception_inside_the_model_leaves_no_stale_state():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Boom())
    prof = FlopsProfiler(model)
    prof.start_profile()
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 4))
    assert prof._stack == []
    prof.end_profile()
    assert torch._C._len_torch_dispatch_stack() == 0


def _forward_flops(fn, *args):
    """(all forward flops, MACs) of ``fn(*args)``."""
    class Wrap(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    prof = FlopsProfiler(Wrap())
    prof.start_profile()
    prof.model(*args)
    counts = prof.get_total_flops(include_other=True), prof.get_total_macs()
    prof.end_profile()
    return counts


def test_operator_formulas():
    x, w = torch.randn(4, 8, 16), torch.randn(16, 32)
    assert _forward_flops(torch.matmul, x, w) == (2 * 4 * 8 * 16 * 32, 4 * 8 * 16 * 32)
    assert _forward_flops(torch.bmm, x, torch.randn(4, 16, 3)) == (2 * 4 * 8 * 16 * 3, 4 * 8 * 16 * 3)
    assert _forward_flops(lambda a, b: torch.einsum("bij,bjk->bik", a, b), x, torch.randn(4, 16, 3))[1] == 4 * 8 * 16 * 3
    bias = torch.randn(8, 5)
    # addmm/baddbmm: the products as MACs, plus one addition per output element for the bias.
    assert _forward_flops(torch.addmm, bias, torch.randn(8, 16), torch.randn(16, 5)) == (2 * 8 * 16 * 5 + 40,
                                                                                       8 * 16 * 5)
    assert _forward_flops(torch.baddbmm, torch.randn(4, 8, 3), x, torch.randn(4, 16, 3)) == (
        2 * 4 * 8 * 16 * 3 + 4 * 8 * 3, 4 * 8 * 16 * 3)
    img, kernel = torch.randn(2, 3, 10, 10), torch.randn(6, 3, 3, 3)
    conv_macs = 2 * 6 * 8 * 8 * 3 * 3 * 3
    assert _forward_flops(F.conv2d, img, kernel)[1] == conv_macs
    n = img.numel()
    assert _forward_flops(F.relu, img) == (n, 0)
    assert _forward_flops(F.gelu, img) == (n, 0)
    assert _forward_flops(F.silu, img) == (n, 0)
    assert _forward_flops(lambda t: F.softmax(t, -1), img) == (n, 0)
    assert _forward_flops(lambda t: F.layer_norm(t, (10,)), img) == (4 * n, 0)
    assert _forward_flops(lambda t: F.layer_norm(t, (10,), torch.ones(10), torch.zeros(10)), img) == (5 * n, 0)
    assert _forward_flops(lambda t: F.group_norm(t, 3, torch.ones(3), torch.zeros(3)), img) == (5 * n, 0)
    assert _forward_flops(lambda t: F.batch_norm(t, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)),
                          img) == (5 * n, 0)
    assert _forward_flops(lambda i: F.embedding(i, torch.randn(50, 7)), torch.randint(0, 50, (3, 4))) == (0, 0)
    assert _forward_flops(lambda t: F.max_pool2d(t, 2), img) == (n, 0)
    assert _forward_flops(lambda t: F.avg_pool2d(t, 2), img) == (n, 0)
    assert _forward_flops(lambda t: F.adaptive_avg_pool2d(t, 1), img) == (n, 0)
    assert _forward_flops(lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"), img) == (4 * n, 0)
    assert _forward_flops(F.conv_transpose2d, img, torch.randn(3, 6, 3, 3))[1] == 2 * 3 * 10 * 10 * 6 * 3 * 3
    q = torch.randn(2, 4, 16, 8)
    assert _forward_flops(lambda a: F.scaled_dot_product_attention(a, a, a), q)[1] == 2 * 2 * 4 * 16 * 16 * 8


def test_get_model_profile_api(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    flops, macs, params = get_model_profile(model, input_shape=(8, 16), print_profile=False)
    assert (flops, macs, params) == (number_to_string(2 * 8 * (16 * 32 + 32 * 4)),
                                     macs_to_string(8 * (16 * 32 + 32 * 4)), params_to_string(16 * 32 + 32 + 32 * 4 + 4))
    out = tmp_path / "sub" / "profile.txt"
    get_model_profile(model, kwargs={"input": torch.randn(8, 16)}, output_file=str(out), module_depth=1,
                      top_modules=2)
    text = out.read_text()
    assert "deepscale flops profiler" in text and "(0) Linear" in text and "depth 1:" in text
    assert capsys.readouterr().out.count("deepscale flops profiler") == 0
    # ignore_modules: the ignored class's operators are counted in its parent, not lost.
    flops_ignored, _, _ = get_model_profile(model, input_shape=(8, 16), print_profile=False, as_string=False,
                                            ignore_modules=[torch.nn.Linear])
    assert flops_ignored == get_model_profile(model, input_shape=(8, 16), print_profile=False, as_string=False)[0]
    with pytest.raises(ValueError, match="mode"):
        get_model_profile(model, input_shape=(8, 16), mode="train")
    with pytest.raises(ValueError, match="generate"):
        get_model_profile(model, input_shape=(8, 16), mode="generate")
    with pytest.raises(ValueError, match="input_shape, args or kwargs"):
        get_model_profile(model)


def test_forward_only_profile_estimates_training_flops():
    model = torch.nn.Linear(16, 16, bias=False)
    prof = FlopsProfiler(model, recompute_fwd_factor=1.0)
    prof.start_profile()
    model(torch.randn(4, 16))
    assert not prof.backward_profiled
    assert prof.get_training_flops() == 4 * prof.get_total_flops()
    assert prof.get_training_flops(include_recompute=False) == 3 * prof.get_total_flops()
    prof.end_profile()
    with pytest.raises(ValueError, match="recompute_fwd_factor"):
        FlopsProfiler(model, recompute_fwd_factor=-1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        FlopsProfiler("not a model")


def test_print_model_profile_text(capsys):
    model = _gpt(impl="manual", checkpoint="reentrant")
    ids, labels = batch_of(SHAPE["vocab"], SHAPE["seq"], SHAPE["batch"])
    prof = _profile_training_step(model, ids, labels)
    prof.print_model_profile(profile_step=3, module_depth=2, top_modules=2)
    text = capsys.readouterr().out
    assert "Profile summary at step 3" in text
    assert "bwd flops per GPU (measured; other flops)" in text and "recompute flops per GPU (measured" in text
    assert "(blocks) ModuleList" in text and "(attn) Attention" not in text  # depth 2 stops above attn
    prof.print_model_aggregated_profile(module_depth=-1, top_modules=1)
    assert "depth 3:" in capsys.readouterr().out
    prof.end_profile()
    prof.print_model_profile()  # after end_profile: nothing to print, no error
    assert capsys.readouterr().out == ""


def test_unit_strings():
    assert number_to_string(1.5e9) == "1.5 G" and number_to_string(0) == "0 " and number_to_string(2e-4) == "200 u"
    assert number_to_string(1234, units="K") == "1.23 K"
    assert params_to_string(1.3e9) == "1.3 B" and macs_to_string(2e6) == "2 MMACs"
    assert flops_to_string(3e12) == "3 TFLOPS" and duration_to_string(0.0125) == "12.5 ms"


def test_hugging_face_gpt2_matches_the_analytic_forward():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
    vocab, d, layers, batch, seq = 1000, 128, 2, 2, 32
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=d, n_layer=layers, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)  # Conv1D (addmm) layers, SDPA attention, head tied to wte
    ids = torch.randint(0, vocab, (batch, seq))
    flops, macs, params = get_model_profile(model, kwargs={"input_ids": ids}, print_profile=False, as_string=False)
    tokens = batch * seq
    assert 2 * macs == 2 * tokens * (layers * 12 * d * d + vocab * d) + layers * 4 * batch * seq * seq * d
    assert params == sum(p.numel() for p in model.parameters()) and model.lm_head.weight is model.transformer.wte.weight
    assert flops == 2 * macs
    # mode="generate": every forward of the generation loop (prefill, then one token at a time with the cache).
    prompt = ids[:1, :8]
    single = get_model_profile(model, args=[prompt], print_profile=False, as_string=False)[0]
    generated = get_model_profile(model, args=[prompt], kwargs={"max_new_tokens": 3, "min_new_tokens": 3,
                                                                "do_sample": False, "pad_token_id": 0},
                                  mode="generate", print_profile=False, as_string=False)[0]
    assert single < generated < 2 * single


def test_peak_flops_table_and_override(monkeypatch):
    from deepscale.profiling.flops_profiler.peak import PEAK_TFLOPS_ENV, peak_flops

    monkeypatch.delenv(PEAK_TFLOPS_ENV, raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", torch.float16) == pytest.approx(756e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == pytest.approx(312e12)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == pytest.approx(19.5e12)
    assert peak_flops(None, torch.bfloat16) is None and peak_flops("Some Future GPU", torch.bfloat16) is None
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "2.5")
    assert peak_flops(None, torch.float32) == pytest.approx(2.5e12)
    monkeypatch.setenv(PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=PEAK_TFLOPS_ENV):
        peak_flops(None, torch.float32)


def test_a_failing_formula_counts_zero_and_does_not_break_the_step(monkeypatch, caplog):
    from deepscale.profiling.flops_profiler import counting

    def broken(*args, **kwargs):
        raise IndexError("unexpected arguments")

    monkeypatch.setitem(counting.MATMUL_FORMULAS, torch.ops.aten.mm, broken)
    model = torch.nn.Linear(8, 8, bias=False)
    prof = FlopsProfiler(model)
    prof.start_profile()
    out = model(torch.randn(4, 8))
    prof.end_profile()
    assert out.shape == (4, 8) and "could not count aten.mm" in caplog.text


class _LeNet5(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        for c_in, c_out in ((1, 6), (6, 16)):
            layers += [torch.nn.Conv2d(c_in, c_out, 5), torch.nn.Tanh(), torch.nn.AvgPool2d(2)]
        self.features = torch.nn.Sequential(*layers, torch.nn.Conv2d(16, 120, 5), torch.nn.Tanh())
        self.classifier = torch.nn.Sequential(torch.nn.Linear(120, 84), torch.nn.Tanh(), torch.nn.Linear(84, 10))

    def forward(self, x):
        logits = self.classifier(torch.flatten(self.features(x), 1))
        return logits, F.softmax(logits, dim=1)


def test_lenet5_figures_that_deepspeed_users_check():
    # The figures DeepSpeed's own profiler test expects for LeNet-5 at batch 1024 (within 5%).
    flops, macs, params = get_model_profile(_LeNet5(), input_shape=(1024, 1, 32, 32), print_profile=False,
                                            as_string=False)
    assert params == 61706
    assert macs == 426516480  # exactly: conv and linear MACs
    assert abs(flops - 866076672) / 866076672 < 0.05


def test_deepspeed_import_paths_resolve_through_the_alias(tmp_path):
    # With the import swapped (the compat shim's alias), DeepSpeed's module paths reach this profiler.
    import os
    import subprocess
    import sys

    package = tmp_path / "deepspeed"
    package.mkdir()
    (package / "__init__.py").write_text("from deepscale.compat.deepspeed_alias import install_alias\n"
                                         "install_alias(globals(), '0.19.8+deepscale')\n")
    code = ("import torch\n"
            "from deepspeed.profiling.flops_profiler import FlopsProfiler, get_model_profile\n"
            "from deepspeed.profiling.flops_profiler.profiler import get_model_profile as gmp, number_to_string\n"
            "import deepscale.profiling.flops_profiler as ours\n"
            "assert FlopsProfiler is ours.FlopsProfiler and gmp is ours.get_model_profile\n"
            "print(gmp(torch.nn.Linear(4, 4, bias=False), input_shape=(2, 4), print_profile=False))\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), repo]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "('64 ', '32 MACs', '16')" in proc.stdout
