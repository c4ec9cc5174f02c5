"""`zhllm model init|info`, `zhllm generate`, `zhllm chat` and their one-line errors on bad input."""
import json
import subprocess
import sys

import pytest

from zhllm.cli import main
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model, save_model


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def zhllm_process(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "zhllm", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(code, err, match):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("init") / "m"
    assert main(["model", "init", "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--seed", "3", "--set", "init_std=0.3"]) == 0
    return out


def test_model_init_writes_a_checkpoint_transformers_loads(init_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = json.loads((init_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(init_dir))
    assert cfg["vocab_size"] == 448 and len(tok) == 400  # 400 rounded up to a multiple of 64
    assert cfg["hidden_size"] == 64 and cfg["eos_token_id"] == tok.eos_token_id
    hf = AutoModelForCausalLM.from_pretrained(str(init_dir))
    assert hf.config.num_hidden_layers == 2
    assert json.loads((init_dir / "generation_config.json").read_text())["eos_token_id"] == [0, 2]


def test_model_init_vocab_rules(tmp_path, tokenizer_dir, capsys):
    code, _, _ = run_cli(["model", "init", "--preset", "tiny", "--tokenizer", tokenizer_dir, "--out",
                          tmp_path / "exact", "--set", "vocab_size=400"], capsys)
    assert code == 0 and json.loads((tmp_path / "exact" / "config.json").read_text())["vocab_size"] == 400
    code, _, err = run_cli(["model", "init", "--preset", "tiny", "--tokenizer", tokenizer_dir, "--out",
                            tmp_path / "small", "--set", "vocab_size=300"], capsys)
    assert_one_line_error(code, err, "cannot hold")
    code, _, err = run_cli(["model", "init", "--preset", "nope", "--tokenizer", tokenizer_dir, "--out",
                            tmp_path / "x"], capsys)
    assert_one_line_error(code, err, "unknown model preset")


def test_model_info(init_dir, capsys):
    code, out, _ = run_cli(["model", "info", init_dir], capsys)
    assert code == 0
    assert "LlamaForCausalLM" in out and "layers 2" in out and "400 tokens, ChatML" in out


def test_generate_command_is_reproducible(init_dir, capsys):
    args = ["generate", init_dir, "--prompt", "今天天气", "--max-new-tokens", "12", "--seed", "5"]
    code, first, _ = run_cli(args, capsys)
    assert code == 0 and first.strip()
    assert run_cli(args, capsys)[1] == first
    code, _, err = run_cli(["generate", init_dir, "--prompt", "你好", "--chat", "--temperature", "0",
                            "--max-new-tokens", "8"], capsys)
    assert code == 0 and not err


def test_generate_with_int8_decoding(init_dir, capsys):
    args = ["generate", init_dir, "--prompt", "今天天气", "--max-new-tokens", "12", "--temperature", "0"]
    code, out, err = run_cli(args + ["--quantize", "int8"], capsys)
    err = "".join(line for line in err.splitlines(True) if "compiling the native int8 decode step" not in line)
    assert code == 0 and not err and out.strip()
    code, _, err = run_cli(args + ["--quantize", "int8", "--dtype", "float32"], capsys)
    assert code == 0 and not err


def test_chat_over_stdin_answers_two_turns(init_dir):
    res = zhllm_process(["chat", init_dir, "--system", "你是助手。", "--max-new-tokens", "8", "--temperature", "0"],
                        stdin="你好\n/reset\n今天天气怎么样？\n")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.count("\n") >= 2  # two answers, each ended by a newline; /reset prints nothing


def test_chat_session_keeps_history_and_resets(init_dir):
    from zhllm.infer.chat import ChatSession
    from zhllm.infer.generate import load_for_inference
    session = ChatSession(*load_for_inference(init_dir, device="cpu"), system="你是助手。", max_new_tokens=6)
    first = "".join(session.reply("你好"))
    "".join(session.reply("再见"))
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == first
    session.reset()
    assert session.history == []


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("bad")
    corrupt = save_model(new_model(model_config_from("tiny", {"vocab_size": 448})), root / "corrupt",
                         tokenizer=tokenizer_dir)
    (corrupt / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    small = save_model(new_model(model_config_from("tiny", {"vocab_size": 64})), root / "small",
                       tokenizer=tokenizer_dir)
    short = save_model(new_model(model_config_from("tiny", {"vocab_size": 448, "max_seq_len": 16})),
                       root / "short", tokenizer=tokenizer_dir)
    return {"missing": (root / "missing", "not found"), "corrupt": (corrupt, "corrupted"),
            "gpt2": (gpt2, "LlamaForCausalLM"), "small": (small, "vocabulary"), "short": (short, "context")}


@pytest.mark.parametrize("case", ["missing", "corrupt", "gpt2", "small", "short"])
def test_bad_input_is_one_line_error(bad_dirs, case, capsys):
    path, match = bad_dirs[case]
    code, _, err = run_cli(["generate", path, "--prompt", "中华人民共和国成立于1949年。北京是中国的首都。"], capsys)
    assert_one_line_error(code, err, match)


def test_bad_input_in_a_real_process(bad_dirs):
    path, match = bad_dirs["corrupt"]
    res = zhllm_process(["chat", path], stdin="你好\n")
    assert_one_line_error(res.returncode, res.stderr, match)
