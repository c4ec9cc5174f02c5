"""zhllm export gguf: llama.cpp (llama-cpp-python) loads the file and computes zhllm's logits, greedy tokens and
token ids; the metadata says what llama.cpp needs; what GGUF cannot hold is a one-line error."""
import sys

import numpy as np
import pytest
import torch

from zhllm import ZhllmError
from zhllm.export.gguf import export_gguf
from zhllm.model.config import model_config_from
from zhllm.model.io import load_model, new_model, save_model
from zhllm.tokenizer.load import load_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'zhllm[gguf]')")

MESSAGES = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "请介绍一下长江，它全长约6300公里吗？Hello world!"}]
TOKENIZER_TEXTS = [
    "<|im_start|>user\n今天天气很好，我们去公园散步吧！<|im_end|>\n<|im_start|>assistant\n好的。<|im_end|>",
    "中华人民共和国成立于1949年。  北京是中国的首都。\n\n\n机器学习 is a 分支 of AI, isn't it?",
    "def add(a, b):\n    return a + b\t# 相加 <|endoftext|>   尾部空格  ",
]
N_NEW = 12


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (test extra; builds from "
                                                   "source with a C++ compiler and cmake)")


def _random_biases(model):
    """init_weights zeroes biases: seeded random ones make them count."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """Lively random tiny models (large init: greedy output changes from token to token): a tied Llama whose
    vocabulary is padded past the tokenizer, and an untied Qwen2 with its q/k/v biases."""
    root = tmp_path_factory.mktemp("gguf_models")
    n_tok = len(load_tokenizer(tokenizer_dir))
    dirs = {}
    for name, over in {"llama": {"arch": "llama", "vocab_size": n_tok + 48},
                       "qwen2": {"arch": "qwen2", "vocab_size": n_tok, "tie_embeddings": False}}.items():
        cfg = model_config_from("tiny", {"init_std": 0.3, **over})
        model = new_model(cfg, seed=3)
        _random_biases(model)
        dirs[name] = save_model(model, root / name, tokenizer=tokenizer_dir)
    return dirs


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_files")
    made = {}
    for arch, kind in [("llama", "f32"), ("llama", "f16"), ("llama", "q8_0"), ("qwen2", "f32"), ("qwen2", "bf16")]:
        made[arch, kind] = export_gguf(models[arch], out / f"{arch}-{kind}.gguf", type=kind).path
    return made


def _prompt_ids(model_dir) -> list[int]:
    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _zhllm_greedy(model_dir, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """zhllm's logits over the prompt, and its greedy continuation (full forward per step)."""
    model = load_model(model_dir, dtype=torch.float32)
    seq = list(ids)
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids]))[0].numpy()
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return prompt_logits, seq[len(ids):]


@pytest.fixture
def llama_at(monkeypatch):
    """A function that opens a GGUF file in llama.cpp."""
    llama_cpp = _llama_cpp()
    # No extra buffer types: on CPUs with AMX, llama.cpp moves q8_0 weights into its AMX buffers, whose matmul
    # segfaults on this file (ggml-org/llama.cpp#20824) and takes the whole test run with it. The plain CPU path
    # reads the same file; `use_extra_bufts` is not a Llama() argument, so its default is changed.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)
    # an f32 KV cache (llama.cpp's default is f16), so an f32 file is compared with zhllm's f32 arithmetic
    return lambda path: llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True,
                                        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                                        verbose=False)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("arch,kind,tol", [("llama", "f32", 1e-4), ("qwen2", "f32", 1e-4), ("llama", "f16", 2e-2)])
def test_llama_cpp_logits_and_greedy_tokens_equal_zhllm(models, files, llama_at, arch, kind, tol):
    ids = _prompt_ids(models[arch])
    want_logits, want_tokens = _zhllm_greedy(models[arch], ids, N_NEW)
    assert len(set(want_tokens)) > 3  # a lively model, not one repeated token
    llm = llama_at(files[arch, kind])
    got = _llama_logits(llm, ids)
    assert got.shape == want_logits.shape
    scale = np.abs(want_logits).max()
    assert np.abs(got - want_logits).max() <= tol * scale, (np.abs(got - want_logits).max(), scale)
    assert _llama_greedy(llm, ids, N_NEW) == want_tokens


@pytest.mark.parametrize("arch,kind,tol", [("llama", "q8_0", 1e-1), ("qwen2", "bf16", 1e-1)])
def test_rounded_files_give_the_same_greedy_tokens_on_most_steps(models, files, llama_at, arch, kind, tol):
    """bf16 keeps 8 bits of mantissa and q8_0 about as many: near-ties of these random models flip (7 to 12 of
    12 steps agreed over 16 seeds), so most steps, not all; a wrong layout agrees on next to none."""
    ids = _prompt_ids(models[arch])
    want_logits, want = _zhllm_greedy(models[arch], ids, 2 * N_NEW)
    # teacher-forced on zhllm's continuation, so one early disagreement does not derail every later step
    got = _llama_logits(llama_at(files[arch, kind]), ids + want)
    assert np.abs(got[:len(ids)] - want_logits).max() <= tol * np.abs(want_logits).max()
    agree = sum(int(g) == w for g, w in zip(got.argmax(-1)[len(ids) - 1:-1], want))
    assert agree > len(want) / 2, (agree, want)


@pytest.mark.parametrize("over", [{"attention_bias": True, "mlp_bias": True},
                                  {"rope_scaling": {"type": "linear", "factor": 2.0}}],
                         ids=["llama-biases", "linear-rope"])
def test_llama_cpp_logits_for_llama_biases_and_linear_rope(tokenizer_dir, tmp_path, llama_at, over):
    cfg = model_config_from("tiny", {"init_std": 0.3, "vocab_size": len(load_tokenizer(tokenizer_dir)), **over})
    model = _random_biases(new_model(cfg, seed=2))
    model_dir = save_model(model, tmp_path / "m", tokenizer=tokenizer_dir)
    ids = list(range(20, 80))
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].numpy()
    got = _llama_logits(llama_at(export_gguf(model_dir, tmp_path / "m.gguf", type="f32").path), ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_llama_cpp_tokenizer_gives_our_ids_with_special_tokens(models, files, llama_at):
    tok = load_tokenizer(models["llama"])
    llm = llama_at(files["llama", "f16"])
    control = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    for text in TOKENIZER_TEXTS:
        want = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want
        # without special parsing, typed control tokens are plain text, as in zhllm's data rule
        plain = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert not control & set(plain) and llm.detokenize(plain).decode("utf-8") == text
    assert llm.token_eos() == tok.eos_token_id
    assert llm.metadata["tokenizer.ggml.eot_token_id"] == str(tok.convert_tokens_to_ids("<|im_end|>"))


def test_metadata_names_shapes_and_chat_template(models, files):
    r = gguf.GGUFReader(str(files["qwen2", "f32"]))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = model_config_from("tiny", {"arch": "qwen2"})
    assert field("general.architecture") == "qwen2"
    assert field("qwen2.block_count") == cfg.n_layers and field("qwen2.embedding_length") == cfg.dim
    assert field("qwen2.attention.head_count_kv") == cfg.n_kv_heads
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "qwen2"
    assert "<|im_start|>" in field("tokenizer.chat_template")
    names = {t.name for t in r.tensors}
    assert {"output.weight", "blk.1.attn_q.bias", "blk.1.attn_v.bias"} <= names  # untied, biased
    tied = gguf.GGUFReader(str(files["llama", "q8_0"]))
    types = {t.name: t.tensor_type.name for t in tied.tensors}
    assert "output.weight" not in types and "blk.0.attn_q.bias" not in types
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 176 are not whole 32-value blocks
    toks = tied.fields["tokenizer.ggml.tokens"].contents()
    n_tok = len(load_tokenizer(models["llama"]))
    assert len(toks) == n_tok + 48 and tied.fields["tokenizer.ggml.token_type"].contents()[-1] == 5  # UNUSED pads


def test_out_policy_overwrite_and_atomic_write(models, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    export_gguf(models["llama"], out, type="q8_0")
    with pytest.raises(ZhllmError, match="exists; pass --overwrite"):
        export_gguf(models["llama"], out)
    export_gguf(models["llama"], out, type="f16", overwrite=True)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ZhllmError, match="not a GGUF file"):
        export_gguf(models["llama"], notes, overwrite=True)
    with pytest.raises(ZhllmError, match="is a directory"):
        export_gguf(models["llama"], tmp_path)
    with pytest.raises(ZhllmError, match="inside the model directory"):
        export_gguf(models["llama"], models["llama"] / "m.gguf")
    # a failure while writing leaves the old file untouched and no staging file behind
    before = out.read_bytes()
    import zhllm.export.gguf as mod
    monkeypatch.setattr(mod, "_convert", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        export_gguf(models["llama"], out, type="f32", overwrite=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.txt"]


def test_what_gguf_cannot_hold_is_a_clear_error(models, tmp_path, monkeypatch):
    import json
    import shutil
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ZhllmError, match="zhllm lora merge"):
        export_gguf(adapter, tmp_path / "a.gguf")

    yarn = shutil.copytree(models["llama"], tmp_path / "yarn")
    cfg = json.loads((yarn / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (yarn / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZhllmError, match="yarn rope scaling"):
        export_gguf(yarn, tmp_path / "y.gguf")

    small = shutil.copytree(models["llama"], tmp_path / "small")
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZhllmError, match="does not belong to this model"):
        export_gguf(small, tmp_path / "s.gguf")

    pre = shutil.copytree(models["llama"], tmp_path / "pre")
    tj = json.loads((pre / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,3}|\p{L}+|\s+"
    (pre / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ZhllmError, match="pre-tokenizer"):
        export_gguf(pre, tmp_path / "p.gguf")

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ZhllmError, match=r"pip install 'zhllm\[gguf\]'"):
        export_gguf(models["llama"], tmp_path / "n.gguf")


def test_cli_writes_the_file_and_reports_errors_in_one_line(models, tmp_path, capsys):
    from zhllm.cli import main
    out = tmp_path / "cli.gguf"
    argv = ["export", "gguf", str(models["qwen2"]), "--out", str(out), "--type", "q8_0"]
    assert main(argv) == 0 and "q8_0" in capsys.readouterr().out and out.read_bytes()[:4] == b"GGUF"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("zhllm: error: --out") and err.count("\n") == 1
