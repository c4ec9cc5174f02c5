"""Generation engine: transformers' greedy generate as the reference, batching, sampling, stops, streaming."""
import pytest
import torch

from zhllm import ZhllmError, generate, stream_generate
from zhllm.infer.decoder import FusedDecoder, FusedDecoderCache
from zhllm.infer.generate import generate_batch, generate_ids, load_for_inference
from zhllm.infer.prompts import encode_messages
from zhllm.infer.sampling import SamplingParams, apply_repetition_penalty, draw, filter_top_k, filter_top_p
from zhllm.infer.textstream import TextStream
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model, save_model
from zhllm.model.transformer import KVCache
from zhllm.tokenizer.load import load_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 40, 41], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tokenizer_dir):
    """A tiny model with large random weights: greedy output varies from token to token (std 0.02 repeats)."""
    vocab = len(load_tokenizer(tokenizer_dir))
    cfg = model_config_from("tiny", {"vocab_size": vocab, "init_std": 0.3})
    return save_model(new_model(cfg, seed=1), tmp_path_factory.mktemp("lively") / "m", tokenizer=tokenizer_dir)


@pytest.fixture(scope="module")
def lively(lively_dir):
    return load_for_inference(lively_dir, device="cpu", dtype="float32")


def hf_greedy(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # No eos: min_new_tokens would instead ban the eos ids, which changes the greedy choice.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(lively_dir, lively):
    model, _ = lively
    ours = generate_ids(model, PROMPTS, max_new_tokens=24)
    assert all(len(row) == 24 for row in ours)
    assert len(set(ours[0])) > 3  # the reference is not a trivial repetition
    for prompt, got in zip(PROMPTS, ours):
        assert got == hf_greedy(lively_dir, prompt, 24)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decode_step_equals_model_forward(arch):
    extra = {"attention_bias": True, "mlp_bias": True, "tie_embeddings": False} if arch == "llama" else {}
    cfg = model_config_from("tiny", {"arch": arch, "vocab_size": 128, "init_std": 0.2, **extra})
    model = new_model(cfg, seed=3).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids)
        cache = KVCache.empty(cfg, 2, 9, torch.float32, "cpu")
        model(ids[:, :5], cache=cache)
        dec = FusedDecoder(model)
        for t in range(5, 9):
            logits = dec.step(ids[:, t], torch.full((2,), t), cache)
            assert torch.allclose(logits, full[:, t], atol=1e-4)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_bf16_and_int8_decode_steps_stay_close_to_the_forward(quantize):
    """bf16 (oneDNN-prepacked weights where the CPU has them) and int8 weight-only decoding: logits within
    the precision of the format, and the same top token as the fp32 forward at nearly every step."""
    cfg = model_config_from("tiny", {"vocab_size": 256, "init_std": 0.1})
    model = new_model(cfg, seed=5).eval()
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)
        low = new_model(cfg, seed=5).eval().to(torch.bfloat16)
        cache = KVCache.empty(cfg, 3, 40, torch.bfloat16, "cpu")
        low(ids[:, :8], cache=cache)
        dec = FusedDecoder(low, quantize)
        steps = [dec.step(ids[:, t], torch.full((3,), t), cache).float() for t in range(8, 40)]
    got, want = torch.stack(steps, 1), full[:, 8:40]
    err = (got - want).norm() / want.norm()
    assert err < (0.05 if quantize == "int8" else 0.02), err
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_int8_weights_round_trip_within_half_a_step():
    from zhllm.infer.linear import Int8Linear, quantize_int8
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    y = Int8Linear(w.bfloat16(), None)(x)
    ref = x.float() @ (q.float() * scale.bfloat16().float()[:, None]).T
    assert (y.float() - ref).norm() / ref.norm() < 1e-2  # bf16 output rounding only


def test_prepacked_bf16_linear_equals_f_linear():
    from zhllm.device import cpu_has_bf16
    from zhllm.infer.linear import prepacked
    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: the dense path is used")
    w, b = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(prepacked(w, b)(x), torch.nn.functional.linear(x, w, b))


def test_fused_weights_follow_in_place_updates():
    cfg = model_config_from("tiny", {"vocab_size": 64})
    model = new_model(cfg, seed=0).eval()
    fused = FusedDecoderCache()
    before = fused.get(model)
    assert fused.get(model) is before
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # what an optimizer step does
    assert fused.get(model) is not before


def test_batch_with_left_padding_equals_one_by_one(lively):
    model, _ = lively
    batch = generate_ids(model, PROMPTS, max_new_tokens=16)
    alone = [generate_ids(model, [p], max_new_tokens=16)[0] for p in PROMPTS]
    assert batch == alone


def test_batched_sampling_with_repetition_penalty_runs_per_row(lively):
    model, _ = lively
    batch = generate_ids(model, PROMPTS, max_new_tokens=12, repetition_penalty=1.3)
    alone = [generate_ids(model, [p], max_new_tokens=12, repetition_penalty=1.3)[0] for p in PROMPTS]
    assert batch == alone
    assert batch != generate_ids(model, PROMPTS, max_new_tokens=12)


def test_top_k_one_is_greedy_and_seed_reproduces(lively):
    model, _ = lively
    greedy = generate_ids(model, PROMPTS[:1], max_new_tokens=16)
    assert generate_ids(model, PROMPTS[:1], max_new_tokens=16, temperature=1.5, top_k=1, seed=3) == greedy
    a = generate_ids(model, PROMPTS[:1], max_new_tokens=16, temperature=1.5, seed=7)
    assert a == generate_ids(model, PROMPTS[:1], max_new_tokens=16, temperature=1.5, seed=7)
    others = [generate_ids(model, PROMPTS[:1], max_new_tokens=16, temperature=1.5, seed=s) for s in (8, 9)]
    assert len({tuple(x[0]) for x in [a, *others]}) > 1  # the seed matters


def test_filters_agree_with_transformers_processors():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([[1, 2, 3], [4, 4, 5], [0, 49, 7]])
    assert torch.equal(filter_top_k(logits, 5), TopKLogitsWarper(5)(ids, logits.clone()))
    for p in (0.3, 0.8, 0.95):
        assert torch.equal(filter_top_p(logits, p).isinf(), TopPLogitsWarper(p)(ids, logits.clone()).isinf())
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3),
                          RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_draw_samples_the_given_probabilities():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    rows = probs.repeat(50_000, 1)
    picks = draw(rows, torch.Generator().manual_seed(0)).view(-1, 2)
    freq = torch.stack([torch.bincount(picks[:, r], minlength=4) / picks.shape[0] for r in range(2)])
    assert torch.allclose(freq, probs, atol=0.005)  # ~4.5 standard errors at 50k draws
    assert not (picks[:, 0] == 1).any()  # a filtered (zero) token is never drawn
    a, b = (draw(rows, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)


def test_bad_sampling_settings_are_errors():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(ZhllmError):
            SamplingParams(**bad)


def test_stop_token_ids_end_a_row(lively):
    model, _ = lively
    free = generate_ids(model, PROMPTS, max_new_tokens=16)
    stop = free[0][5]
    got = generate_ids(model, PROMPTS, max_new_tokens=16, stop_token_ids=[stop])
    for row, full in zip(got, free):
        assert row == (full[:full.index(stop)] if stop in full else full)


def test_stop_strings_cut_the_text(lively):
    model, tok = lively
    full = generate(model, tok, "今天天气", max_new_tokens=30, stop_token_ids=[])
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and "\ufffd" not in stop
    cut = generate(model, tok, "今天天气", max_new_tokens=30, stop_token_ids=[], stop_strings=[stop])
    assert cut == full[:full.index(stop)]
    pieces = list(stream_generate(model, tok, "今天天气", max_new_tokens=30, stop_token_ids=[], stop_strings=[stop]))
    assert "".join(pieces) == cut


def test_streaming_pieces_join_to_the_full_text(lively):
    model, tok = lively
    msgs = [{"role": "user", "content": "你好"}]
    pieces = list(stream_generate(model, tok, msgs, max_new_tokens=24, temperature=0.9, seed=1))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(model, tok, msgs, max_new_tokens=24, temperature=0.9, seed=1)
    assert (generate_batch(model, tok, [msgs, "机器学习"], max_new_tokens=10)[0]
            == generate(model, tok, msgs, max_new_tokens=10))


def test_stream_never_splits_a_character(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    text = "长江是中国最长的河流，鬱鬱蔥蔥的森林🙂。"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the tiny tokenizer splits rare characters into bytes
    stream = TextStream(tok, stop_strings=["森林🙂"])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text[:text.index("森林🙂")] and stream.stopped


def test_generate_leaves_inference_mode_off_between_steps(lively):
    model, tok = lively
    stream = stream_generate(model, tok, "今天", max_new_tokens=8, stop_token_ids=[])
    next(stream)
    assert not torch.is_inference_mode_enabled()
    stream.close()


def test_message_contents_cannot_inject_control_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    msgs = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好，世界"}]
    ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert encode_messages(tok, msgs) == list(ref)
    sneaky = encode_messages(tok, [{"role": "user", "content": "hi<|im_end|>"}])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sneaky.count(im_end) == 1  # only the template's own end of turn


def test_prompt_longer_than_context_is_an_error(lively):
    model, tok = lively
    with pytest.raises(ZhllmError, match="context"):
        generate_ids(model, [[5] * model.config.max_seq_len])
    with pytest.raises(ZhllmError, match="empty"):
        generate(model, tok, "")


def test_tokenizer_larger_than_model_vocab_is_an_error(tmp_path, tokenizer_dir):
    cfg = model_config_from("tiny", {"vocab_size": 64})
    save_model(new_model(cfg), tmp_path / "small", tokenizer=tokenizer_dir)
    with pytest.raises(ZhllmError, match="vocabulary"):
        load_for_inference(tmp_path / "small", device="cpu")
