"""zhllm eval --task bpb: bits per byte equal an independent computation, windows, and the same documents
and bytes whatever the tokenizer."""
import json
import math

import pytest
import torch

from zhllm.eval.bpb import bits_per_byte, document_windows, limited_texts
from zhllm.eval.compare import EvalOptions, run_eval
from zhllm.infer.engine import Engine
from zhllm.tokenizer.encode import encode_text

DOCS = ["今天天气很好，我们去公园散步吧！" * 3, "长江是中国最长的河流。", "Hello, 世界 🌏",
        "机器学习是人工智能的一个分支。" * 2]


def independent_bits(model, tok, docs, context, stride):
    """Sum of -log2 p over every document token, each from its own forward over the window prefix that
    the windowing promises it (the last `context` tokens at most, from a window start k*stride)."""
    total = 0.0
    with torch.no_grad():
        for doc in docs:
            ids = [tok.eos_token_id] + encode_text(tok, doc)
            for t in range(1, len(ids)):
                start = max(0, math.ceil((t - context) / stride)) * stride
                logp = model(torch.tensor([ids[start:t]]))[0, -1].double().log_softmax(-1)
                total -= float(logp[ids[t]]) / math.log(2)
    return total


@pytest.mark.parametrize("context,stride", [(None, None), (12, 5)])
def test_bits_per_byte_equals_an_independent_computation(tiny_model_dir, context, stride):
    engine = Engine.load(tiny_model_dir, device="cpu", dtype="float32")
    res = bits_per_byte(engine, DOCS, context=context, stride=stride, batch_tokens=64)
    nbytes = sum(len(d.encode("utf-8")) for d in DOCS)
    want = independent_bits(engine.model, engine.tokenizer, DOCS, context or 10_000, stride or 1)
    assert res.bytes == nbytes and res.docs == 4
    assert res.tokens == sum(len(encode_text(engine.tokenizer, d)) for d in DOCS)
    assert res.bits_per_byte == pytest.approx(want / nbytes, abs=1e-6)
    assert res.perplexity == pytest.approx(2 ** (want / res.tokens), rel=1e-6)
    if context:
        assert res.windows > 4  # the long documents were cut into windows


def test_windows_score_every_token_once_with_enough_context():
    ids = list(range(30))
    wins = list(document_windows(0, ids, context=8, stride=3))
    scored = [t for w in wins for t in w.tokens[len(w.tokens) - w.scored:]]
    assert scored == ids[1:]
    assert all(len(w.tokens) <= 9 for w in wins)
    assert all(len(w.tokens) - w.scored >= 8 - 3 + 1 for w in wins[1:])  # context - stride tokens before, and more


def test_documents_are_cut_and_counted_the_same_whatever_the_tokenizer(tmp_path, tiny_model_dir, corpus):
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.tokenizer.train import train_tokenizer_from_texts
    other_tok = train_tokenizer_from_texts(corpus, vocab_size=300, out_dir=tmp_path / "tok300")
    other = save_model(new_model(model_config_from("tiny", {"vocab_size": len(load_tokenizer(other_tok))}), seed=1),
                       tmp_path / "other", tokenizer=other_tok)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS) + "{bad\n",
                    encoding="utf-8")
    opts = EvalOptions(task="bpb", inputs=[str(data)], max_docs=3, max_chars_per_doc=9, dtype="float32",
                       progress=False)
    report = run_eval([str(tiny_model_dir), str(other)], opts, out=str(tmp_path / "out"), log=lambda *a: None)
    a, b = report["models"].values()
    want = sum(len(t.encode("utf-8")) for t in limited_texts(DOCS, 3, 9))
    assert a["docs"] == b["docs"] == 3 and a["bytes"] == b["bytes"] == want
    assert a["tokens"] != b["tokens"]
    written = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert written["models"][str(other)]["bpb"] == pytest.approx(b["bpb"])
    assert (tmp_path / "out" / ".zhllm-output.json").is_file()
    assert "| bits/byte |" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
