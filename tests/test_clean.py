"""`zhllm data clean`: normalisation, filters, exact + near dedup, shards + report, CLI errors, real data."""
import gzip
import json
import random
from itertools import islice
from pathlib import Path

import pytest

from conftest import shared_data
from zhllm.cli import main
from zhllm.data.clean import CleanConfig, clean_corpus, format_clean_report, load_clean_config
from zhllm.data.dedup import DedupConfig, Deduplicator, exact_key, minhash_signature
from zhllm.data.normalize import normalize_text, nfkc_keep_cjk_punct
from zhllm.data.quality import QualityThresholds, quality_reason
from zhllm.corpus.readers import iter_texts
from zhllm.errors import ConfigError, ZhllmError

# The first 2000 ideographs of the CJK block: random picks share no long runs, unlike real prose.
POOL = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]


def synthetic_docs(n: int, length: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        chars = [rng.choice(POOL) for _ in range(length)]
        for i in range(20, length, rng.randint(15, 30)):
            chars[i] = rng.choice("，。")
        docs.append("".join(chars) + "。")
    return docs


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_shards(out: Path) -> list[dict]:
    rows = []
    for shard in sorted(out.glob("part-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


# ------------------------------------------------------------------------------------------- normalise

def test_nfkc_keeps_chinese_punctuation_and_meaningful_symbols():
    text = "你好，世界！真的吗？注意：是的；（括号）～……面积50m²，30℃，①"
    assert nfkc_keep_cjk_punct(text) == text


def test_nfkc_converts_full_width_letters_digits_and_compat_ideographs():
    assert nfkc_keep_cjk_punct("ＡＢＣ１２３％") == "ABC123%"
    assert nfkc_keep_cjk_punct("\uf900") == "\u8c48"   # CJK compatibility ideograph -> unified
    assert nfkc_keep_cjk_punct("ｶﾀｶﾅ") == "カタカナ"


def test_whitespace_and_control_cleanup():
    raw = "\ufeff第一行\x07\u200b  有空格\t\t\r\n\r\n\r\n\r\n第二段\u3000\u3000结束  \n"
    assert normalize_text(raw) == "第一行 有空格\n\n第二段 结束"
    assert normalize_text("我 爱 北京 and you", join_cjk_spaces=True) == "我爱北京 and you"


def test_traditional_to_simplified():
    assert normalize_text("我們的軟體很好，這是測試。", t2s=True) == "我们的软体很好，这是测试。"
    assert normalize_text("我們的軟體", t2s=True, opencc_config="tw2sp") == "我们的软件"


# -------------------------------------------------------------------------------------------- filters

@pytest.mark.parametrize("text,reason", [
    ("太短了", "too_short"),
    ("This document is written almost entirely in English, 只有几个汉字。", "low_cjk_ratio"),
    ("特价商品限时抢购，欢迎光临本店铺★★★|||###***@@@", "high_symbol_ratio"),
    ("首页\n新闻\n首页\n新闻\n首页\n新闻\n首页\n新闻\n正文在这里", "repeated_lines"),
    ("太好笑了哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈", "repeated_chars"),
    ("买手机就来这里买手机就来这里买手机就来这里买手机就来这里买手机就来这里", "repeated_ngrams"),
])
def test_each_filter_removes_what_it_should(text, reason):
    assert quality_reason(text, QualityThresholds()) == reason


def test_filters_keep_ordinary_prose_and_can_be_switched_off():
    prose = ("长江是中国最长的河流，全长约6300公里，"
             "流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏和上海。")
    assert quality_reason(prose, QualityThresholds()) is None
    off = QualityThresholds(min_chars=0, min_cjk_ratio=0, max_symbol_ratio=1, max_dup_line_ratio=1,
                            max_char_run_ratio=1, max_dup_ngram_ratio=1)
    assert quality_reason("哈哈哈哈哈哈哈哈哈哈哈哈", off) is None


# ---------------------------------------------------------------------------------------------- dedup

def test_dedup_removes_planted_exact_and_near_duplicates_keeps_distinct():
    docs = synthetic_docs(30)
    near = docs[3][:100] + "改" + docs[3][101:200] + "动" + docs[3][201:]   # two characters edited
    respaced = " ".join([docs[5][:150], docs[5][150:]])                      # same text, extra space
    dedup = Deduplicator(DedupConfig())
    cfg = DedupConfig()
    results = [dedup.check(exact_key(d), minhash_signature(d, cfg)) for d in docs + [near, respaced, docs[7]]]
    assert results[:30] == [None] * 30
    assert results[30:] == ["near_duplicate", "exact_duplicate", "exact_duplicate"]


def test_near_dedup_threshold_is_respected():
    base = synthetic_docs(1, length=400, seed=1)[0]
    half = base[:200] + synthetic_docs(1, length=200, seed=2)[0]   # shares half of its shingles
    for threshold, expected in [(0.9, None), (0.2, "near_duplicate")]:
        cfg = DedupConfig(threshold=threshold)
        dedup = Deduplicator(cfg)
        dedup.check(exact_key(base), minhash_signature(base, cfg))
        assert dedup.check(exact_key(half), minhash_signature(half, cfg)) == expected


def test_signatures_are_stable_across_runs():
    # A constant, not a second computation: hash()-based shingles would change with PYTHONHASHSEED.
    sig = minhash_signature("春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", DedupConfig())
    assert len(sig) == 128 and int(sig.astype("int64").sum()) == 25614990091


# ------------------------------------------------------------------------------------ corpus pipeline

def planted_corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    docs = synthetic_docs(40)
    rows = [{"text": d, "source": f"s{i % 3}"} for i, d in enumerate(docs)]
    rows += [{"text": docs[0]}, {"text": "  " + docs[1].replace("。", "。\n")},  # exact after normalising
             {"text": docs[2][:50] + "变" + docs[2][51:]},                       # near duplicate
             {"text": "太短"}, {"text": "哈" * 50}, {"text": "ＡＢＣ" + "全角字母和数字１２３的文档，内容足够长。"},
             {"nope": 1}, "not json at all"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path, docs


def test_clean_corpus_end_to_end(tmp_path):
    path, docs = planted_corpus(tmp_path)
    cfg = CleanConfig(docs_per_shard=16)
    report = clean_corpus([str(path)], tmp_path / "out", cfg, progress=False)
    rows = read_shards(tmp_path / "out")
    texts = [r["text"] for r in rows]
    assert texts[:40] == docs
    assert texts[40:] == ["ABC全角字母和数字123的文档，内容足够长。"]
    assert rows[0]["source"] == "s0" and "source" not in rows[40]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".zhllm-output.json") == [
        "part-00000.jsonl.gz", "part-00001.jsonl.gz", "part-00002.jsonl.gz", "report.json"]
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["removed"] == {"exact_duplicate": 2, "near_duplicate": 1, "too_short": 1, "repeated_chars": 1}
    assert report["read"]["bad"] == {"invalid_json": 1, "missing_field": 1}
    assert report["records_read"] == 48 and report["docs_in"] == 46 and report["docs_kept"] == 41
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["read"]["out"] == 46 and stages["quality"]["removed"] == 2 and stages["near_dedup"]["out"] == 41
    assert [s["docs"] for s in report["shards"]] == [16, 16, 9]
    assert report["by_source"] == {"s0": {"in": 14, "kept": 14}, "s1": {"in": 13, "kept": 13},
                                   "s2": {"in": 13, "kept": 13}}
    assert list(iter_texts([str(tmp_path / "out")])) == texts  # the output directory is itself a corpus
    table = format_clean_report(report)
    assert "near_dedup" in table and "kept 41 of 46" in table and "invalid_json" in table


def test_output_is_identical_with_two_workers(tmp_path):
    path, _ = planted_corpus(tmp_path)
    one = clean_corpus([str(path)], tmp_path / "w1", progress=False, workers=1)
    two = clean_corpus([str(path)], tmp_path / "w2", progress=False, workers=2)
    assert read_shards(tmp_path / "w1") == read_shards(tmp_path / "w2")
    assert one["stages"] == two["stages"]


def test_failed_run_leaves_no_output(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "好的文档内容在这里，足够长了。"}, {"x": 1}])
    with pytest.raises(ZhllmError, match=f"{path}:2: missing_field"):
        clean_corpus([str(path)], tmp_path / "out", strict=True, progress=False)
    with pytest.raises(ZhllmError, match="no documents read"):
        clean_corpus([str(write_jsonl(tmp_path / "empty.jsonl", [{"x": 1}]))], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("t2s: true\nquality:\n  min_chars: 50\n")
    cfg = load_clean_config(cfg_file, ["dedup.threshold=0.7"])
    assert cfg.t2s and cfg.quality.min_chars == 50 and cfg.dedup.threshold == 0.7 and cfg.dedup.num_perm == 128
    with pytest.raises(ConfigError, match="quality.min_char"):
        load_clean_config(None, ["quality.min_char=5"])
    packaged = Path(__file__).resolve().parents[1] / "src" / "zhllm" / "configs" / "clean" / "default.yaml"
    assert load_clean_config(packaged) == CleanConfig()


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_clean_prints_table(tmp_path, capsys):
    path, _ = planted_corpus(tmp_path)
    code = main(["data", "clean", "-i", str(path), "-o", str(tmp_path / "out"), "--no-progress",
                 "--set", "t2s=true", "--set", "dedup.near=false"])
    out = capsys.readouterr().out
    assert code == 0 and "exact_dedup" in out and "kept 42 of 46" in out   # the near duplicate survives


@pytest.mark.parametrize("extra,message", [
    (["--strict"], ":47: missing_field"),
    (["--set", "quality.nope=1"], "unknown key 'quality.nope'"),
    (["--set", "dedup.threshold=2"], "dedup.threshold must be between 0 and 1"),
    (["--set", "dedup.backend=nope"], "dedup.backend must be one of disk, memory, got 'nope'"),
    (["--set", "quality.min_cjk_ratio=30"], "quality.min_cjk_ratio must be between 0 and 1"),
    (["--set", "t2s=true", "--set", "opencc_config=nope"], "opencc_config 'nope' is not an OpenCC conversion"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, extra, message):
    path, _ = planted_corpus(tmp_path)
    code = main(["data", "clean", "-i", str(path), "-o", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_input(tmp_path, capsys):
    code = main(["data", "clean", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out")])
    assert code == 2 and "input not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- real sample

def test_real_prose_sample_with_planted_duplicates(tmp_path):
    src = shared_data("pretrain/web_wiki_news_zh.jsonl")
    with open(src, encoding="utf-8") as f:
        rows = [json.loads(line) for line in islice(f, 2000)]
    long_docs = [r for r in rows if len(r["text"]) > 400][:20]
    planted = [{"text": r["text"] + "\n\n", "source": "planted_exact"} for r in long_docs[:10]]
    planted += [{"text": r["text"][:200] + "变" + r["text"][201:], "source": "planted_near"} for r in long_docs[10:]]
    path = write_jsonl(tmp_path / "sample.jsonl", rows + planted)
    report = clean_corpus([str(path)], tmp_path / "out", progress=False)
    kept = read_shards(tmp_path / "out")
    assert report["docs_in"] == len(rows) + 20
    assert not [r for r in kept if r.get("source", "").startswith("planted")]
    assert report["removed"]["exact_duplicate"] >= 10 and report["removed"]["near_duplicate"] >= 10
    assert report["docs_kept"] > 0.9 * len(rows)   # real prose mostly survives the default filters
    assert sum(s["docs"] for s in report["shards"]) == report["docs_kept"] == len(kept)
