"""The blocked causal-attention backward used in compiled CPU training equals SDPA's gradients."""
import pytest
import torch
import torch.nn.functional as F

from zhllm.model import causal_attention as ca


def qkv(T: int, dtype=torch.float32, B: int = 2, H: int = 3, D: int = 16):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def sdpa_grads(q, k, v, grad_out):
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out.float())
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("T", [1, 100, 128, 300])  # one block, exact blocks, a partial last block
def test_blocked_backward_equals_sdpa_fp32(T):
    q, k, v = qkv(T)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    grad_out = torch.randn_like(out)
    got = ca.blocked_causal_attention_backward(q, k, v, out, lse, grad_out)
    for a, b in zip(got, sdpa_grads(q, k, v, grad_out)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_blocked_backward_bf16_within_bf16_rounding():
    # Products take bf16 probabilities and score gradients, as GPU flash attention does: about 1% of the
    # largest gradient off the fp32 result (PyTorch's CPU flash backward, which keeps them fp32, is 0.5%).
    q, k, v = qkv(300, torch.bfloat16)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    grad_out = torch.randn_like(out)
    got = ca.blocked_causal_attention_backward(q, k, v, out, lse, grad_out)
    for a, r in zip(got, sdpa_grads(q, k, v, grad_out)):
        assert a.dtype == torch.bfloat16
        assert (a.float() - r).abs().max() <= 0.02 * r.abs().max()


def test_compiled_attention_uses_the_blocked_backward_and_matches_eager(monkeypatch):
    calls = []
    original = ca.blocked_causal_attention_backward
    monkeypatch.setattr(ca, "blocked_causal_attention_backward", lambda *a: calls.append(1) or original(*a))
    q, k, v = qkv(200)
    grad_out = torch.randn(2, 3, 200, 16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: ca.causal_attention(q * 1.5, k, v) * 2)
    out = compiled(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    eager_out = ca.causal_attention(q * 1.5, k, v) * 2  # eagerly: SDPA and its own backward
    want = torch.autograd.grad(eager_out, (q, k, v), grad_out)
    assert calls, "the compiled graph did not trace the blocked backward"
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_compiled_attention_under_bf16_autocast_computes_in_bf16():
    q, k, v = qkv(130)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: ca.causal_attention(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(q, k, v)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
    out.float().sum().backward()
    ref = sdpa_grads(q, k, v, torch.ones(2, 3, 130, 16))
    for x, r in zip((q, k, v), ref):
        assert x.grad.dtype == torch.float32
        torch.testing.assert_close(x.grad, r, atol=0.1, rtol=0.05)
