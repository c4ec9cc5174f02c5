"""The native batch-1 int8 decode step equals the PyTorch int8 step (to bf16 rounding) and falls back cleanly."""
import shutil

import pytest
import torch

import zhllm.infer.native as native
from zhllm.infer.decoder import FusedDecoder
from zhllm.infer.engine import Engine
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model
from zhllm.model.transformer import KVCache

CAN_BUILD = shutil.which("c++") is not None and __import__("torch.utils.cpp_extension").utils.cpp_extension \
    .is_ninja_available()


def tiny_bf16(**over):
    cfg = model_config_from("tiny", {"vocab_size": 160, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                     "ffn_dim": 128, **over})
    return new_model(cfg, seed=3).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def module():
    m = native.native_decode()
    if m is None:
        assert not CAN_BUILD, "a C++ compiler and ninja are here, so the native step must build"
        pytest.skip("no C++ compiler or ninja: the native step cannot be built here")
    return m


def decode(dec: FusedDecoder, cfg, steps: int):
    cache = KVCache.empty(cfg, 1, steps + 1, torch.bfloat16, "cpu")
    tok, out = torch.tensor([7]), []
    with torch.inference_mode():
        for i in range(steps):
            logits = dec.step(tok, torch.tensor([i]), cache)
            tok = logits.argmax(-1)
            out.append(logits.float())
    return torch.cat(out), cache


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4, "tie_embeddings": False}])
def test_native_step_equals_pytorch_step(module, over):
    model = tiny_bf16(**over)
    fast = FusedDecoder(model, "int8")
    assert fast.native is module
    slow = FusedDecoder(model, "int8")
    slow.native = None
    a, cache_a = decode(fast, model.config, 24)
    b, cache_b = decode(slow, model.config, 24)
    scale = b.abs().max()
    assert (a - b).abs().max() <= 0.03 * scale  # bf16 rounding of different op orders
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    for x, y in ((cache_a.k[..., :24, :], cache_b.k[..., :24, :]), (cache_a.v[..., :24, :], cache_b.v[..., :24, :])):
        assert (x.float() - y.float()).abs().max() <= 0.03 * y.float().abs().max()
    assert cache_a.length == cache_b.length == 24


def test_generation_uses_it_only_where_it_applies(module):
    model = tiny_bf16()
    engine = Engine(model, quantize="int8")
    prompts = [[5, 9, 11], [3, 4]]
    one = engine.generate_batch(prompts[:1], max_new_tokens=12).completions[0].token_ids  # batch 1: native
    both = [c.token_ids for c in engine.generate_batch(prompts, max_new_tokens=12).completions]  # PyTorch step
    assert engine._fused.get(model).native is not None
    assert len(one) == 12 and len(both[0]) == len(both[1]) == 12
    assert sum(x == y for x, y in zip(one, both[0])) >= 10
    assert FusedDecoder(tiny_bf16(attention_bias=True), "int8").native is None  # biases: PyTorch step
    assert FusedDecoder(model.float(), "int8").native is None  # fp32 activations: PyTorch step


def test_build_failure_falls_back_with_one_message(monkeypatch, capsys):
    import torch.utils.cpp_extension as ext
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)

    def no_compiler(**_):
        raise RuntimeError("Error building extension: c++: command not found")
    monkeypatch.setattr(ext, "load", no_compiler)
    assert native.native_decode() is None and native.native_decode() is None
    err = capsys.readouterr().err
    assert err.count("unavailable") == 1 and "command not found" in err
    assert FusedDecoder(tiny_bf16(), "int8").native is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.native_decode() is None
