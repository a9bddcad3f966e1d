"""Smoke tests of the GPT example: model, synthetic data and the training script."""
import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
GPT_DIR = REPO / "examples" / "gpt"
TINY = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--vocab_size", "64",
        "--seq_len", "16", "--num_samples", "64"]


def _load(name: str, filename: str):
    # Distinct module names: the example's files are called model.py and data.py.
    spec = importlib.util.spec_from_file_location(name, GPT_DIR / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt = _load("gpt_example_model_under_test", "model.py")
data = _load("gpt_example_data_under_test", "data.py")


def _tiny(**overrides):
    cfg = dict(n_layer=2, n_head=2, d_model=32, vocab_size=64, seq_len=16)
    cfg.update(overrides)
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(**cfg))


def test_benchmark_size_parameter_count_and_tied_head():
    model = gpt.GPT(gpt.GPTConfig(n_layer=6, n_head=8, d_model=512, vocab_size=8192, seq_len=256))
    d, v, s, n = 512, 8192, 256, 6
    per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert model.num_parameters() == v * d + s * d + n * per_block + 2 * d
    assert 22e6 < model.num_parameters() < 26e6
    assert model.lm_head.weight is model.tok_emb.weight


def test_initial_loss_near_uniform_and_batch_forms_agree():
    model = _tiny().eval()
    ids = torch.randint(0, 64, (3, 16))
    labels = torch.randint(0, 64, (3, 16))
    loss = model({"input_ids": ids, "labels": labels})
    assert loss.dim() == 0 and abs(loss.item() - math.log(64)) < 0.3
    assert torch.equal(loss, model((ids, labels)))
    labels[:, :8] = gpt.IGNORE_INDEX  # ignored labels must not count
    full = torch.nn.functional.cross_entropy(model.logits(ids)[:, 8:].reshape(-1, 64),
                                             labels[:, 8:].reshape(-1))
    assert torch.allclose(model((ids, labels)), full, atol=1e-6)


def test_attention_is_causal():
    model = _tiny().eval()
    ids = torch.randint(0, 64, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 64
    a, b = model.logits(ids), model.logits(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


def test_bad_config_and_batch_are_rejected_with_names():
    with pytest.raises(ValueError, match="d_model.*n_head"):
        gpt.GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        gpt.GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        gpt.GPTConfig(dropout=1.5)
    model = _tiny()
    with pytest.raises(ValueError, match="labels"):
        model({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_len"):
        model.logits(torch.zeros(1, 17, dtype=torch.long))


def test_markov_data_is_deterministic_shifted_and_follows_the_chain():
    ds = data.MarkovChainDataset(num_samples=8, seq_len=16, vocab_size=64, seed=3)
    again = data.MarkovChainDataset(num_samples=8, seq_len=16, vocab_size=64, seed=3)
    other = data.MarkovChainDataset(num_samples=8, seq_len=16, vocab_size=64, seed=4)
    assert torch.equal(ds.tokens, again.tokens) and not torch.equal(ds.tokens, other.tokens)
    item = ds[2]
    assert item["input_ids"].shape == item["labels"].shape == (16,)
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    allowed = ds.successors[item["input_ids"]]  # (16, num_successors)
    assert bool((allowed == item["labels"].unsqueeze(1)).any(dim=1).all())
    assert 0 < ds.entropy_rate() < math.log(4) + 1e-6
    with pytest.raises(ValueError, match="num_successors"):
        data.MarkovChainDataset(vocab_size=4, num_successors=8)


def test_loss_falls_on_markov_data():
    ds = data.MarkovChainDataset(num_samples=64, seq_len=16, vocab_size=64, seed=0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = {"input_ids": ds.tokens[:16, :-1], "labels": ds.tokens[:16, 1:]}
    first = model(batch).item()
    for _ in range(40):
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 1.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_script_single_process_bf16(tmp_path):
    out = _run([sys.executable, str(GPT_DIR / "train.py"), "--deepspeed_config",
                str(GPT_DIR / "ds_config_bf16.json"), "--steps", "2", *TINY])
    assert "done: 2 steps" in out


def test_train_script_two_ranks_with_launcher_saves_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    out = _run([sys.executable, "-m", "deepscale.launcher", "--num_procs", "2", "--master_port",
                str(_free_port()), str(GPT_DIR / "train.py"), "--deepspeed_config",
                str(GPT_DIR / "ds_config.json"), "--steps", "2", "--save_dir", str(save), *TINY])
    assert "done: 2 steps" in out and "2 processes" in out
    assert (save / "latest").read_text().strip() == "global_step2"
