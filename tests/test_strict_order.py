"""--strict names the first bad record in file order, whichever stage (reader or encoder) rejects it and however
many workers run: a file with bad records at lines 7 and 15."""
import json
from pathlib import Path

import pytest

from zhllm.data.clean import clean_corpus
from zhllm.data.sft_shards import tokenize_sft
from zhllm.data.tokenize import tokenize_corpus
from zhllm.errors import ZhllmError

INVALID_UTF8 = b'{"instruction": "\xff\xfe\xfd", "output": "x", "text": "\xff\xfe"}'
BAD_CHAT = '{"instruction": "", "output": "", "content": 5}'.encode()  # empty turns; no text field for corpora


def _write(path: Path, bad: dict[int, bytes]) -> Path:
    lines = []
    for i in range(1, 41):
        rec = {"instruction": f"第{i}个问题是什么？", "output": f"这是第{i}个回答。",
               "text": f"这是第{i}篇文档，内容足够长，可以通过质量过滤器的检查。" * 3}
        lines.append(bad.get(i, json.dumps(rec, ensure_ascii=False).encode()))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


CASES = {"utf8 first": {7: INVALID_UTF8, 15: BAD_CHAT}, "utf8 second": {7: BAD_CHAT, 15: INVALID_UTF8}}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_sft(tmp_path, tokenizer_dir, case, workers):
    src = _write(tmp_path / "chat.jsonl", CASES[case])
    with pytest.raises(ZhllmError, match=r"chat\.jsonl:7: "):
        tokenize_sft([str(src)], tokenizer_dir, tmp_path / "out", max_len=64, strict=True, workers=workers,
                     progress=False)


@pytest.mark.parametrize("case", CASES)
def test_data_tokenize(tmp_path, tokenizer_dir, case):
    src = _write(tmp_path / "docs.jsonl", CASES[case])
    with pytest.raises(ZhllmError, match=r"docs\.jsonl:7: "):
        tokenize_corpus([str(src)], tokenizer_dir, tmp_path / "out", strict=True, workers=2, unit_chars=60,
                        progress=False)


@pytest.mark.parametrize("case", CASES)
def test_data_clean(tmp_path, case):
    src = _write(tmp_path / "docs.jsonl", CASES[case])
    with pytest.raises(ZhllmError, match=r"docs\.jsonl:7: "):
        clean_corpus([src], tmp_path / "out", strict=True, workers=2, progress=False)
