"""Shared fixtures: a tiny Chinese tokenizer and tiny model made by the tests themselves (no downloads)."""
import os
from pathlib import Path

import pytest

# The sample data sits next to the repository on the project's machines; a fresh clone elsewhere points
# ZHLLM_SHARED_DATA at its copy.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA_ENV = "ZHLLM_SHARED_DATA"

CORPUS = [
    "今天天气很好，我们去公园散步吧！",
    "中华人民共和国成立于1949年。北京是中国的首都。",
    "机器学习是人工智能的一个分支，研究计算机怎样从数据中学习。",
    "小明有3个苹果，又买了5个，现在一共有8个苹果。",
    "长江是中国最长的河流，全长约6300公里。",
    "Hello, world. 你好，世界。This is a mixed 中英文 sentence.",
    "def add(a, b):\n    return a + b\n",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "用户：请介绍一下你自己。助手：我是一个小型中文语言模型。",
] * 20


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from zhllm.tokenizer.train import train_tokenizer_from_texts
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer_from_texts(CORPUS, vocab_size=400, out_dir=out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random tiny llama checkpoint (dim 64, 2 layers) with the test tokenizer inside."""
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    vocab = len(load_tokenizer(tokenizer_dir))
    cfg = model_config_from("tiny", {"vocab_size": vocab})
    out = tmp_path_factory.mktemp("model") / "tiny"
    return save_model(new_model(cfg, seed=0), out, tokenizer=tokenizer_dir)


def shared_data(rel: str) -> Path:
    """Path under $ZHLLM_SHARED_DATA (default ../shared/data), or skip the test cleanly when it is absent."""
    root = os.environ.get(SHARED_DATA_ENV)
    p = (Path(root).expanduser() if root else SHARED_DATA) / rel
    if not p.exists():
        pytest.skip(f"shared sample data not available: {p}")
    return p
