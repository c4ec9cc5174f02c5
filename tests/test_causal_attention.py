"""The blocked causal attention used in compiled bf16 CPU training equals flash attention and SDPA's gradients."""
import pytest
import torch
import torch.nn.functional as F

from zhllm.model import causal_attention as ca


def qkv(T: int, dtype=torch.float32, B: int = 2, H: int = 3, D: int = 16):
    g = torch.Generator().manual_seed(T)
    return [torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def sdpa_grads(q, k, v, grad_out):
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out.float())
    return q.grad, k.grad, v.grad


def flash(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]


@pytest.mark.parametrize("T", [1, 100, 128, 300])  # one block, exact blocks, a partial last block
def test_blocked_forward_equals_flash_fp32(T):
    q, k, v = qkv(T)
    out, lse = ca.blocked_causal_attention_forward(q, k, v)
    want_out, want_lse = flash(q, k, v)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)


def test_blocked_forward_bf16_within_bf16_rounding():
    q, k, v = qkv(300, torch.bfloat16)
    out, lse = ca.blocked_causal_attention_forward(q, k, v)
    ref = F.scaled_dot_product_attention(*(x.float() for x in (q, k, v)), is_causal=True)
    assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 0.01
    torch.testing.assert_close(lse, flash(q, k, v)[1], atol=0.02, rtol=0.01)


@pytest.mark.parametrize("T", [1, 100, 128, 300])  # one block, exact blocks, a partial last block
def test_blocked_backward_equals_sdpa_fp32(T):
    q, k, v = qkv(T)
    out, lse = flash(q, k, v)
    grad_out = torch.randn_like(out)
    got = ca.blocked_causal_attention_backward(q, k, v, out, lse, grad_out)
    for a, b in zip(got, sdpa_grads(q, k, v, grad_out)):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_blocked_backward_bf16_within_bf16_rounding():
    # Products take bf16 probabilities and score gradients, as GPU flash attention does: 0.5% off the fp32
    # result in norm (PyTorch's CPU flash backward, which keeps them fp32, is 0.3%; bf16's epsilon is 0.4%).
    q, k, v = qkv(300, torch.bfloat16)
    out, lse = flash(q, k, v)
    grad_out = torch.randn_like(out)
    got = ca.blocked_causal_attention_backward(q, k, v, out, lse, grad_out)
    for a, r in zip(got, sdpa_grads(q, k, v, grad_out)):
        assert a.dtype == torch.bfloat16
        assert relative_error(a, r) < 0.01


@pytest.fixture
def blocked_calls(monkeypatch):
    calls = []
    for name in ("blocked_causal_attention_forward", "blocked_causal_attention_backward"):
        original = getattr(ca, name)
        monkeypatch.setattr(ca, name, lambda *a, name=name, original=original: calls.append(name) or original(*a))
    torch._dynamo.reset()
    return calls


def test_compiled_bf16_attention_is_blocked(blocked_calls):
    q, k, v = qkv(200, torch.bfloat16)
    grad_out = torch.randn(2, 3, 200, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    compiled = torch.compile(lambda q, k, v: ca.causal_attention(q * 1.5, k, v) * 2)
    out = compiled(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert set(blocked_calls) == {"blocked_causal_attention_forward", "blocked_causal_attention_backward"}
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref_out = F.scaled_dot_product_attention(q32 * 1.5, k32, v32, is_causal=True) * 2
    assert out.dtype == torch.bfloat16 and relative_error(out, ref_out) < 0.01
    for a, r in zip(got, torch.autograd.grad(ref_out, (q32, k32, v32), grad_out.float())):
        assert relative_error(a, r) < 0.01


@pytest.mark.parametrize("dtype, T", [(torch.float32, 200), (torch.bfloat16, ca.MAX_SEQ + 1)])
def test_fp32_and_long_sequences_keep_sdpa(blocked_calls, dtype, T):
    q, k, v = qkv(T, dtype, B=1, H=1)
    out = torch.compile(lambda q, k, v: ca.causal_attention(q, k, v))(q, k, v)
    out.float().sum().backward()
    assert not blocked_calls
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_compiled_attention_under_bf16_autocast_computes_in_bf16(blocked_calls):
    q, k, v = qkv(130)
    compiled = torch.compile(lambda q, k, v: ca.causal_attention(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(q, k, v)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 0.01
    out.float().sum().backward()
    assert set(blocked_calls) == {"blocked_causal_attention_forward", "blocked_causal_attention_backward"}
    ref = sdpa_grads(q, k, v, torch.ones(2, 3, 130, 16))
    for x, r in zip((q, k, v), ref):
        assert x.grad.dtype == torch.float32
        assert relative_error(x.grad, r) < 0.01


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-tensors", "bf16-autocast"])
def test_eager_short_bf16_rows_compute_in_fp32(autocast):
    """Eagerly, rows up to SHORT_SEQ long take PyTorch's fp32 attention (its bf16 kernel is slow there): the
    output is the fp32 result rounded once to bf16, gradients are those of the fp32 attention; longer rows
    keep the bf16 kernel."""
    q32, k32, v32 = qkv(ca.SHORT_SEQ)
    if autocast:
        q, k, v = (x.detach().requires_grad_() for x in (q32, k32, v32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ca.causal_attention(q, k, v)
        q_in, k_in, v_in = (x.detach().bfloat16().float() for x in (q, k, v))  # what autocast hands on
    else:
        q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q32, k32, v32))
        out = ca.causal_attention(q, k, v)
        q_in, k_in, v_in = (x.detach().float() for x in (q, k, v))
    ref_inputs = [x.requires_grad_() for x in (q_in, k_in, v_in)]
    ref = F.scaled_dot_product_attention(*ref_inputs, is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
    grad_out = torch.randn_like(ref)
    out.backward(grad_out.bfloat16())
    for x, r in zip((q, k, v), torch.autograd.grad(ref, ref_inputs, grad_out.bfloat16().float())):
        assert relative_error(x.grad.float(), r) < 0.01
    q, k, v = qkv(ca.SHORT_SEQ + 1, torch.bfloat16)
    torch.testing.assert_close(ca.causal_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=0, atol=0)
