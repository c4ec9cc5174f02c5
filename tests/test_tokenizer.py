"""zhllm tokenizer train: HF-loadable output for both backends, exact round trips, ChatML, bounded sampling, CLI."""
import json

import pytest

from conftest import shared_data
from zhllm.cli import main
from zhllm.tokenizer.encode import encode_text, special_token_ids
from zhllm.tokenizer.sample import chunk_text, sample_texts
from zhllm.tokenizer.train import train_tokenizer

ROUND_TRIP = [
    "中华人民共和国成立于1949年。今天天气很好，我们去公园散步吧！",
    "Hello, world! It's a mixed 中英文 sentence with  double  spaces.\n\n",
    "def add(a, b):\n    return a + b  # 注释\n\tx = [1, 2, 3]\n",
    "表情 😀🎉👍🏽 和生僻字 𠀀𰻞 以及 ½ ﬁ Ω é\u0301 ！（全角）",
    "  leading and trailing spaces  ",
]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def trained(request, tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp(request.param)
    data = write_jsonl(tmp / "corpus.jsonl", corpus + ROUND_TRIP[:3])
    report = train_tokenizer([str(data)], tmp / "tok", vocab_size=600, max_chars=10**6, backend=request.param,
                             num_reserved=5, show_progress=False)
    return report


def test_loads_as_plain_fast_tokenizer(trained):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(trained.out_dir))
    assert tok.is_fast and isinstance(tok, PreTrainedTokenizerFast)
    cfg = json.loads((trained.out_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg  # no custom code
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0
    assert len(tok) <= 600
    assert {0, 1, 2, 3, 4, 5, 6, 7} <= special_token_ids(tok)  # 3 + 5 reserved
    assert trained.heldout_chars_per_token > 1.0


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(trained, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained.out_dir))
    ids = encode_text(tok, text)
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained.out_dir))
    ids = encode_text(tok, "20241949")
    assert [tok.decode([i]) for i in ids] == list("20241949")


def test_chatml_template_and_specials_in_data(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained.out_dir))
    msgs = [{"role": "user", "content": "你好<|im_end|>"}, {"role": "assistant", "content": "我很好。"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\n你好<|im_end|><|im_end|>\n<|im_start|>assistant\n我很好。<|im_end|>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs[:1], tokenize=True, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2  # the template's control tokens are real
    content_ids = encode_text(tok, msgs[0]["content"])
    assert 2 not in content_ids and tok.decode(content_ids) == "你好<|im_end|>"


def test_sentencepiece_backend_matches_sentencepiece(corpus):
    import sentencepiece as spm

    from zhllm.tokenizer.spm import sentencepiece_to_tokenizers, train_sentencepiece_model

    proto = train_sentencepiece_model(corpus, vocab_size=500, num_reserved=2)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tok = sentencepiece_to_tokenizers(proto)
    for text in corpus[:9]:
        assert encode_text(tok, text) == sp.encode(text)
    assert sp.id_to_piece([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_sentencepiece_vocab_too_small_is_one_line(corpus):
    from zhllm.errors import ZhllmError
    from zhllm.tokenizer.spm import train_sentencepiece_model

    with pytest.raises(ZhllmError, match="vocab"):
        train_sentencepiece_model(corpus, vocab_size=100)


# ---- bounded sampling

def test_sample_respects_budget_and_is_deterministic():
    texts = [f"文档{i}：" + "好" * (i % 37) for i in range(3000)]
    a = sample_texts(iter(texts), max_chars=5000, seed=1)
    assert 0 < a.chars <= 5000 and sum(map(len, a.texts)) == a.chars
    assert a.seen_docs == 3000 and a.seen_chars == sum(map(len, texts))
    assert a == sample_texts(iter(texts), max_chars=5000, seed=1)
    assert a.texts != sample_texts(iter(texts), max_chars=5000, seed=2).texts
    assert not set(a.texts) & set(a.heldout)
    positions = sorted(texts.index(t) for t in a.texts)
    assert positions[0] < 300 and positions[-1] > 2700  # spread over the whole stream, not a prefix
    assert a.chars > 4000  # the budget is used, not left mostly empty


def test_sample_cuts_huge_documents():
    book = ("第一章。" * 3000 + "\n") * 5
    chunks = list(chunk_text(book, 1000))
    assert "".join(chunks) == book and max(map(len, chunks)) <= 1000
    s = sample_texts([book], max_chars=5000)
    assert 0 < s.chars <= 5000


def test_train_respects_max_chars(tmp_path, corpus):
    data = write_jsonl(tmp_path / "c.jsonl", corpus * 5)
    report = train_tokenizer([str(data)], tmp_path / "tok", vocab_size=300, max_chars=2000, show_progress=False)
    assert report.chars_seen == sum(map(len, corpus * 5))
    assert 1000 < report.chars_trained <= 2000


# ---- CLI

def test_cli_train_and_errors(tmp_path, corpus, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", corpus)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(data), "--vocab-size", "320", "--out", str(out),
                 "--max-chars", "100000", "--num-reserved", "2"]) == 0
    assert "held-out chars/token" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    bad_runs = [
        ["tokenizer", "train", "--input", str(tmp_path / "missing.jsonl"), "--vocab-size", "300", "--out", str(out)],
        ["tokenizer", "train", "--input", str(data), "--vocab-size", "100", "--out", str(tmp_path / "t2")],
        ["tokenizer", "train", "--input", str(data), "--vocab-size", "300", "--out", str(out), "--max-chars", "0"],
        ["tokenizer", "eval", "--tokenizer", str(tmp_path / "nope"), "--input", str(data)],
        ["tokenizer", "extend", "--base", str(out), "--input", str(data), "--add", "5", "--out",
         str(tmp_path / "e"), "--model", str(tmp_path)],
    ]
    for argv in bad_runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("zhllm: error: ") == 1, err
        assert err.rstrip("\n").splitlines()[-1].startswith("zhllm: error: "), err
    assert not (tmp_path / "t2").exists()


def test_cli_help_for_every_command(capsys):
    for cmd in ("train", "extend", "eval"):
        with pytest.raises(SystemExit) as e:
            main(["tokenizer", cmd, "--help"])
        assert e.value.code == 0
        assert "--input" in capsys.readouterr().out


# ---- integration on the real prose sample

def test_train_on_real_prose(tmp_path):
    from transformers import AutoTokenizer

    src = shared_data("pretrain/weibo_zh.jsonl")
    report = train_tokenizer([str(src)], tmp_path / "tok", vocab_size=2000, max_chars=300_000, show_progress=False)
    assert report.chars_trained <= 300_000 and report.docs_seen > 40_000
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = json.loads(src.open(encoding="utf-8").readline())["text"]
    assert tok.decode(encode_text(tok, text)) == text
    assert report.heldout_chars_per_token > 1.0  # raw bytes would give ~0.4: characters and words were learnt


@pytest.mark.parametrize("backend", ["bpe", "sentencepiece"])
def test_training_is_deterministic(tmp_path, corpus, backend):
    data = write_jsonl(tmp_path / "c.jsonl", [f"{i}：{t}" for i, t in enumerate(corpus)])
    outs = [train_tokenizer([str(data)], tmp_path / f"t{i}", vocab_size=500, max_chars=3000, seed=seed,
                            backend=backend, show_progress=False).out_dir for i, seed in enumerate([7, 7, 8])]
    files = [(o / "tokenizer.json").read_bytes() for o in outs]
    assert files[0] == files[1]
    assert files[0] != files[2]  # another seed samples other documents


def test_byte_level_model_encodes_as_the_character_level_model_it_came_from(corpus):
    """byte_bpe.py: the merges learnt on characters, rewritten over bytes, cut texts into the same pieces."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from zhllm.tokenizer.byte_bpe import byte_level_model, byte_symbols, train_char_level
    from zhllm.tokenizer.train import SPLIT_PATTERN, byte_level_pre_tokenizer
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    alphabet = sorted(set("".join(corpus)))
    merges = train_char_level(corpus, 600, split, 2, False, alphabet)
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    chars = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    chars.pre_tokenizer = split
    size = 256 + 2000  # room for every learnt merge
    converted = Tokenizer(byte_level_model(alphabet, merges, [], size))
    converted.pre_tokenizer = byte_level_pre_tokenizer()
    symbol = byte_symbols()
    assert sorted(symbol) == sorted(pre_tokenizers.ByteLevel.alphabet())
    for text in set(corpus):
        want = ["".join(symbol[b] for b in piece.encode("utf-8")) for piece in chars.encode(text).tokens]
        assert converted.encode(text).tokens == want
    assert len(merges) > 100
