"""``attn_implementation="deepscale"`` in a transformers model matches the eager implementation."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from deepscale.ops.attention import register_hf_attention  # noqa: E402


def _tiny_llama(impl):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation(impl)
    return model


def _count_fused_calls(monkeypatch):
    from deepscale.ops.attention import hf
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return real(*args, **kwargs)

    real = hf.attention
    monkeypatch.setattr(hf, "attention", counting)
    return calls


def test_llama_matches_eager_with_and_without_padding(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    name = register_hf_attention()
    ours, eager = _tiny_llama(name), _tiny_llama("eager")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    out = ours(input_ids=ids, labels=ids)
    ref = eager(input_ids=ids, labels=ids)
    assert calls == [True, True]  # both layers ran the fused op, causally
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=n)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask tensor path (transformers' sdpa)
    torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[1, 5:],
                               eager(input_ids=ids, attention_mask=mask).logits[1, 5:], rtol=1e-4, atol=1e-4)


def test_generation_with_kv_cache_matches_eager(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    name = register_hf_attention()
    ours, eager = _tiny_llama(name), _tiny_llama("eager")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    got = ours.generate(ids, max_new_tokens=8, do_sample=False)
    want = eager.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert len(calls) >= 2 * 8  # prefill and every decoding step of both layers
