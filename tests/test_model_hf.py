"""zhllm's model against transformers' LlamaForCausalLM / Qwen2ForCausalLM on the same directory."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from zhllm.errors import ZhllmError
from zhllm.model.config import ModelConfig, RopeScaling
from zhllm.model.io import load_model, new_model, save_model
from zhllm.model.transformer import KVCache

VARIANTS = {
    "llama-gqa-tied": dict(arch="llama", tie_embeddings=True, n_heads=4, n_kv_heads=2),
    "llama-mha-untied": dict(arch="llama", tie_embeddings=False, n_heads=4, n_kv_heads=4),
    "llama-mqa-bias": dict(arch="llama", tie_embeddings=False, n_heads=4, n_kv_heads=1, attention_bias=True,
                           mlp_bias=True),
    "qwen2-gqa-untied": dict(arch="qwen2", tie_embeddings=False, n_heads=4, n_kv_heads=2),
    "qwen2-tied": dict(arch="qwen2", tie_embeddings=True, n_heads=4, n_kv_heads=2),
    "llama-yarn": dict(arch="llama", rope_scaling=RopeScaling(type="yarn", factor=4.0,
                                                              original_max_position_embeddings=32)),
    "llama-linear": dict(arch="llama", rope_scaling=RopeScaling(type="linear", factor=2.0)),
    "llama3-rope": dict(arch="llama", rope_scaling=RopeScaling(type="llama3", factor=8.0,
                                                               original_max_position_embeddings=32)),
}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=128,
                rope_theta=10000.0, init_std=0.1)
    base.update(kw)
    return ModelConfig(**base)


def ids(B=2, T=24, V=97, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers_both_directions(tmp_path, name):
    cfg = tiny_config(**VARIANTS[name])
    ours = new_model(cfg, seed=1)
    if cfg.attention_bias:  # biases start at zero; make them matter
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
    save_model(ours, tmp_path / "zh")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "zh", dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        got = ours.eval()(x)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    # transformers' save_pretrained -> zhllm
    hf.save_pretrained(tmp_path / "hf")
    back = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(back(x), ref, atol=1e-4)
    assert back.config.tie_embeddings == cfg.tie_embeddings


def test_kv_cache_token_by_token_equals_full_forward():
    model = new_model(tiny_config(), seed=3).eval()
    x = ids(B=2, T=16)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.empty(model.config, 2, 32, torch.float32, "cpu")
        prefix = model(x[:, :5], cache=cache)
        steps = [model(x[:, t:t + 1], cache=cache) for t in range(5, 16)]
    got = torch.cat([prefix] + steps, dim=1)
    assert torch.allclose(got, full, atol=1e-5)


def test_logits_at_positions_equal_the_full_logits_there():
    """RL updates ask for the completion positions' logits only; the gradient reaches the same weights."""
    model = new_model(tiny_config(), seed=3)
    x = ids(B=2, T=16)
    at = torch.tensor([[3, 4, 5, 0], [10, 11, 12, 13]])
    full = model(x)
    picked = model(x, logits_at=at)
    assert picked.shape == (2, 4, full.shape[-1])
    want = full.gather(1, at[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(picked, want, atol=1e-5)
    g_full = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    g_at = torch.autograd.grad(picked.square().sum(), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, g_at))


def test_chunked_prefill_with_cache_is_causal():
    model = new_model(tiny_config(), seed=4).eval()
    x = ids(B=1, T=12)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.empty(model.config, 1, 16, torch.float32, "cpu")
        a = model(x[:, :4], cache=cache)
        b = model(x[:, 4:], cache=cache)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


def test_left_padding_matches_unpadded():
    model = new_model(tiny_config(), seed=5).eval()
    x = ids(B=1, T=10)
    pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(x)
        got = model(pad, attention_mask=mask)[:, 3:]
    assert torch.allclose(got, ref, atol=1e-5)


def test_packed_segments_equal_separate_documents():
    model = new_model(tiny_config(), seed=6).eval()
    a, b = ids(B=1, T=7, seed=1), ids(B=1, T=9, seed=2)
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        got = model(packed, segment_ids=seg)
        ref = torch.cat([model(a), model(b)], 1)
    assert torch.allclose(got, ref, atol=1e-5)


def test_bad_directories_give_clear_errors(tmp_path):
    with pytest.raises(ZhllmError, match="not found"):
        load_model(tmp_path / "missing")
    d = tmp_path / "m"
    save_model(new_model(tiny_config()), d)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ZhllmError, match="corrupted"):
        load_model(d)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ZhllmError, match="LlamaForCausalLM"):
        load_model(other)


def test_init_scales_residual_projections():
    cfg = tiny_config(n_layers=8, dim=128, ffn_dim=256, init_std=0.02)
    m = new_model(cfg, seed=0)
    q = m.model.layers[0].self_attn.q_proj.weight.std().item()
    o = m.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q - 0.02) < 0.002 and abs(o - 0.02 / 4) < 0.001
