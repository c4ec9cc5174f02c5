"""zhllm tokenizer extend (appended BPE merges, old ids unchanged) and embedding resize (mean of old pieces)."""
import json

import pytest
import torch

from conftest import shared_data
from zhllm.cli import main
from zhllm.errors import ZhllmError
from zhllm.tokenizer.encode import encode_text, special_token_ids
from zhllm.tokenizer.extend import bpe_pieces, extend_tokenizer
from zhllm.tokenizer.load import load_tokenizer

NEW_DOMAIN = [
    "量子计算机利用量子比特进行计算，量子纠缠让量子计算机在某些问题上远快于经典计算机。",
    "神经网络的反向传播算法计算梯度，梯度下降再用梯度更新神经网络的参数。",
    "区块链是一种分布式账本，区块链上的每个区块都记录了交易。",
] * 30
ADD = 24


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def extended(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("ext")
    data = write_jsonl(tmp / "new.jsonl", NEW_DOMAIN)
    report = extend_tokenizer(tokenizer_dir, [str(data)], ADD, tmp / "tok", show_progress=False)
    return report


def test_extend_keeps_old_ids_and_adds_n(extended, tokenizer_dir):
    from transformers import AutoTokenizer

    old = load_tokenizer(tokenizer_dir)
    new = AutoTokenizer.from_pretrained(str(extended.out_dir))
    assert new.is_fast
    assert extended.added == ADD and len(new) == len(old) + ADD
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert sorted(i for t, i in new_vocab.items() if t not in old_vocab) == list(range(len(old), len(old) + ADD))
    # old merges are untouched and come first
    old_merges = json.loads(old.backend_tokenizer.to_str())["model"]["merges"]
    new_merges = json.loads(new.backend_tokenizer.to_str())["model"]["merges"]
    assert new_merges[:len(old_merges)] == old_merges and len(new_merges) == len(old_merges) + ADD


def test_extend_compresses_and_round_trips(extended, tokenizer_dir, corpus):
    old, new = load_tokenizer(tokenizer_dir), load_tokenizer(extended.out_dir)
    text = NEW_DOMAIN[0] + "<|im_end|>"
    assert len(encode_text(new, text)) < len(encode_text(old, text))
    assert extended.tokens_after < extended.tokens_before
    for t in [text, *corpus[:9], "表情😀 and English 123"]:
        ids = encode_text(new, t)
        assert new.decode(ids) == t
        assert not set(ids) & special_token_ids(new)
    assert new.chat_template == old.chat_template
    assert new.eos_token == old.eos_token and new.pad_token_id == old.pad_token_id


def test_every_new_token_is_reachable(extended):
    """Each appended merge fires on its own text: the token is not dead vocabulary."""
    new = load_tokenizer(extended.out_dir)
    backend = new.backend_tokenizer
    for i in range(len(new) - ADD, len(new)):
        token = new.convert_ids_to_tokens(i)
        assert [t.id for t in backend.model.tokenize(token)] == [i]


def test_bpe_pieces_follows_rank_order():
    ranks = {("a", "b"): 0, ("b", "c"): 1, ("ab", "c"): 2}
    assert bpe_pieces(list("abc"), ranks) == ["abc"]
    assert bpe_pieces(list("bca"), ranks) == ["bc", "a"]
    assert bpe_pieces(list("xyz"), ranks) == ["x", "y", "z"]


def test_extend_sentencepiece_backend(tmp_path, corpus):
    from zhllm.tokenizer.train import train_tokenizer

    data = write_jsonl(tmp_path / "c.jsonl", corpus)
    base = train_tokenizer([str(data)], tmp_path / "sp", vocab_size=450, backend="sentencepiece",
                           num_reserved=2, show_progress=False).out_dir
    new_data = write_jsonl(tmp_path / "n.jsonl", NEW_DOMAIN)
    report = extend_tokenizer(base, [str(new_data)], 10, tmp_path / "ext", show_progress=False)
    old, new = load_tokenizer(base), load_tokenizer(tmp_path / "ext")
    assert report.added == 10 and len(new) == len(old) + 10
    new_vocab = new.get_vocab()
    assert all(new_vocab[t] == i for t, i in old.get_vocab().items())
    assert new.decode(encode_text(new, NEW_DOMAIN[1])) == NEW_DOMAIN[1]
    assert len(encode_text(new, NEW_DOMAIN[1])) < len(encode_text(old, NEW_DOMAIN[1]))


def test_extend_bad_args(tmp_path, tokenizer_dir):
    data = write_jsonl(tmp_path / "n.jsonl", NEW_DOMAIN)
    with pytest.raises(ZhllmError, match="--add"):
        extend_tokenizer(tokenizer_dir, [str(data)], 0, tmp_path / "x", show_progress=False)
    with pytest.raises(ZhllmError, match="not found"):
        extend_tokenizer(tmp_path / "nope", [str(data)], 5, tmp_path / "x", show_progress=False)


# ---- embedding resize

def _model_with(tmp_path, tokenizer_dir, tie: bool):
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model

    cfg = model_config_from("tiny", {"vocab_size": len(load_tokenizer(tokenizer_dir)), "tie_embeddings": tie})
    return save_model(new_model(cfg, seed=1), tmp_path / f"model_tie{tie}", tokenizer=tokenizer_dir)


@pytest.mark.parametrize("tie", [True, False])
def test_resize_initialises_new_rows_from_old_pieces(tmp_path, extended, tokenizer_dir, tie):
    from zhllm.model.io import load_model
    from zhllm.model.resize import resize_embeddings

    model_dir = _model_with(tmp_path, tokenizer_dir, tie)
    report = resize_embeddings(model_dir, extended.out_dir, tmp_path / "resized")
    old_model, new_model = load_model(model_dir), load_model(tmp_path / "resized")
    old_tok, new_tok = load_tokenizer(tokenizer_dir), load_tokenizer(tmp_path / "resized")
    n_old = old_model.model.embed_tokens.weight.shape[0]
    assert report.new_rows == len(new_tok) == new_model.config.vocab_size == n_old + ADD
    old_e, new_e = old_model.model.embed_tokens.weight, new_model.model.embed_tokens.weight
    old_h, new_h = old_model.lm_head.weight, new_model.lm_head.weight
    assert torch.equal(new_e[:n_old], old_e) and torch.equal(new_h[:n_old], old_h)
    checked = whole = 0
    for i in range(n_old, len(new_tok)):
        text = new_tok.decode([i])
        if "\ufffd" in text:  # part of a character: no text, so split its bytes with the old BPE model
            pieces = [t.id for t in old_tok.backend_tokenizer.model.tokenize(new_tok.convert_ids_to_tokens(i))]
        else:
            pieces = old_tok.encode(text, add_special_tokens=False)
            whole += 1
        assert len(pieces) > 1
        torch.testing.assert_close(new_e[i], old_e[pieces].mean(0))
        torch.testing.assert_close(new_h[i], old_h[pieces].mean(0))
        checked += 1
    assert checked == ADD and whole >= 3
    if tie:
        assert new_model.lm_head.weight.data_ptr() == new_model.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(new_h[n_old:], new_e[n_old:])
    ids = torch.tensor([encode_text(new_tok, NEW_DOMAIN[0])])
    assert new_model(ids).shape == (1, ids.shape[1], len(new_tok))


def test_resize_refuses_unrelated_tokenizer(tmp_path, tiny_model_dir, corpus):
    from zhllm.model.resize import resize_embeddings
    from zhllm.tokenizer.train import train_tokenizer_from_texts

    other = train_tokenizer_from_texts(NEW_DOMAIN, vocab_size=350, out_dir=tmp_path / "other")
    with pytest.raises(ZhllmError, match="changes or drops"):
        resize_embeddings(tiny_model_dir, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_extend_with_model(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "n.jsonl", NEW_DOMAIN)
    assert main(["tokenizer", "extend", "--base", str(tiny_model_dir), "--input", str(data), "--add", "8",
                 "--out", str(tmp_path / "tok"), "--model", str(tiny_model_dir),
                 "--model-out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "new tokens" in out and "rows" in out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vocab_size"] == len(load_tokenizer(tmp_path / "m"))


def test_extend_real_minimind(tmp_path):
    base = shared_data("tokenizers/minimind")
    src = shared_data("pretrain/web_wiki_news_zh.jsonl")
    report = extend_tokenizer(base, [str(src)], 50, tmp_path / "tok", max_chars=50_000, show_progress=False)
    old, new = load_tokenizer(base), load_tokenizer(tmp_path / "tok")
    assert report.added == 50 and len(new) == len(old) + 50
    new_vocab = new.get_vocab()
    assert all(new_vocab[t] == i for t, i in old.get_vocab().items())
    assert report.tokens_after < report.tokens_before


def test_extend_prints_no_blank_lines_when_not_a_terminal(tmp_path, tokenizer_dir, corpus, capfd):
    """The `tokenizers` trainer ends each of its bars with a newline on stdout: with output piped they
    would be all a log shows, so they only run on a terminal."""
    data = write_jsonl(tmp_path / "new.jsonl", corpus)
    extend_tokenizer(tokenizer_dir, [str(data)], 8, tmp_path / "ext", show_progress=True)
    out, err = capfd.readouterr()
    assert out == "" and all(line.strip() for line in err.splitlines()), (out, err)
