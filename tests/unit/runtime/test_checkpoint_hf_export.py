"""The documented route from a deepscale checkpoint to a Hugging Face model saved as safetensors."""
import pytest
import torch

MICRO_BS = 2


def test_zero3_checkpoint_to_hf_safetensors(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face route needs transformers")
    pytest.importorskip("safetensors", reason="safetensors output needs the safetensors package")
    import deepscale
    from deepscale.utils.zero_to_fp32 import load_state_dict_from_zero_checkpoint

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    engine = deepscale.initialize(model=transformers.GPT2LMHeadModel(config), config={
        "train_micro_batch_size_per_gpu": MICRO_BS, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 3}})[0]
    ids = torch.randint(0, 64, (MICRO_BS, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    engine.eval()
    with torch.no_grad():
        trained_loss = engine(input_ids=ids, labels=ids).loss.item()
    engine.destroy()

    fresh = transformers.GPT2LMHeadModel(config)
    load_state_dict_from_zero_checkpoint(fresh, str(tmp_path / "ckpt")).save_pretrained(
        str(tmp_path / "hf"), safe_serialization=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert reloaded(input_ids=ids, labels=ids).loss.item() == pytest.approx(trained_loss, abs=1e-6)
