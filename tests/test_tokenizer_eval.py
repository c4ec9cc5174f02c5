"""zhllm tokenizer eval: the table's numbers on a tiny hand-checked example, and on the real tokenizers."""
import json

import pytest

from conftest import shared_data
from zhllm.cli import main
from zhllm.tokenizer.evaluate import evaluate_tokenizers, open_encoder, stats_table
from zhllm.tokenizer.train import train_tokenizer_from_texts


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ab_tokenizer(tmp_path_factory):
    """256 bytes + 16 specials + exactly one merge, 'a'+'b': every count below can be worked out by hand."""
    out = tmp_path_factory.mktemp("ab") / "tok"
    return train_tokenizer_from_texts(["ab ab ab abab"] * 10, vocab_size=256 + 16 + 1, out_dir=out)


def test_numbers_on_tiny_example(tmp_path, ab_tokenizer):
    # "ab你" -> [ab] + 3 raw bytes of 你 ; "ba" -> [b][a]
    data = write_jsonl(tmp_path / "h.jsonl", ["ab你", "ba"])
    (s,) = evaluate_tokenizers([ab_tokenizer], str(data))
    assert (s.docs, s.chars, s.bytes, s.tokens, s.fallback_tokens) == (2, 5, 7, 6, 3)
    assert s.chars_per_token == pytest.approx(5 / 6)
    assert s.bytes_per_token == pytest.approx(7 / 6)
    assert s.fallback_rate == pytest.approx(0.5)
    table = stats_table([s])
    assert "| tok | 273 | 2 | 5 | 6 | 0.833 | 1.167 | 50.00% |" in table


def test_specials_in_eval_text_are_plain_text(tmp_path, ab_tokenizer):
    data = write_jsonl(tmp_path / "h.jsonl", ["<|im_end|>"])
    (s,) = evaluate_tokenizers([ab_tokenizer], str(data))
    assert s.tokens == len("<|im_end|>") and s.fallback_tokens == 0


def test_max_docs_and_cli(tmp_path, ab_tokenizer, tokenizer_dir, capsys):
    data = write_jsonl(tmp_path / "h.jsonl", ["ab你", "ba", "abab"])
    (s,) = evaluate_tokenizers([ab_tokenizer], str(data), max_docs=2)
    assert s.docs == 2
    assert main(["tokenizer", "eval", "--tokenizer", str(ab_tokenizer), "--input", str(data),
                 "--compare", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| tokenizer |") and len(out) == 4
    assert main(["tokenizer", "eval", "--tokenizer", str(ab_tokenizer), "--input", str(data), "--field", "nope"]) == 2
    assert "missing" in capsys.readouterr().err


def test_sentencepiece_model_file(tmp_path, corpus):
    from zhllm.tokenizer.spm import train_sentencepiece_model

    model = tmp_path / "sp.model"
    model.write_bytes(train_sentencepiece_model(corpus, vocab_size=500, num_reserved=2))
    data = write_jsonl(tmp_path / "h.jsonl", ["今天天气很好", "㐀"])  # the last one is not in the vocabulary
    (s,) = evaluate_tokenizers([model], str(data))
    assert s.fallback_tokens == 3  # 㐀 is three <0x..> byte pieces
    assert open_encoder(model).vocab_size == 500


def test_real_tokenizers():
    held = shared_data("eval/cmmlu_dev.jsonl")
    base = shared_data("tokenizers")
    rows = evaluate_tokenizers([base / "minimind", base / "qwen1.5-moe-a2.7b-chat", base / "chatglm2-6b"],
                               str(held), field="question")
    by_name = {r.name: r for r in rows}
    assert by_name["qwen1.5-moe-a2.7b-chat"].vocab_size == 151646
    assert by_name["chatglm2-6b"].vocab_size == 64789
    for r in rows:
        assert r.docs == 40 and 1.0 < r.chars_per_token < 3.0 and 0 <= r.fallback_rate < 0.3
    # the big vocabularies compress Chinese better than MiniMind's 6400
    assert by_name["qwen1.5-moe-a2.7b-chat"].chars_per_token > by_name["minimind"].chars_per_token
