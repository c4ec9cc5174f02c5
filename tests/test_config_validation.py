"""Training configs: every numeric setting is range-checked at start-up, the same way for every stage, and
a bad value is one ConfigError line naming the key and the file (never a traceback or a silent no-op run)."""
import pytest
import yaml

from zhllm.cli import main
from zhllm.errors import ConfigError
from zhllm.train.config import load_run_config
from zhllm.train.sft import load_sft_config

# (key, bad value) pairs that both stages share: train/eval/checkpoint/log sections.
SHARED_BAD = [
    ("train.lr", -0.001), ("train.lr", 0), ("train.lr", ".nan"), ("train.lr", ".inf"),
    ("train.max_steps", -5), ("train.max_steps", 0), ("train.max_steps", ".inf"), ("train.max_tokens", 0),
    ("train.batch_size", 0), ("train.grad_accum", 0), ("train.seq_len", 1),
    ("train.min_lr_ratio", 1.5), ("train.min_lr_ratio", -0.1), ("train.warmup_steps", -1),
    ("train.decay_fraction", 0), ("train.weight_decay", -0.1), ("train.beta1", 1.0), ("train.beta2", -0.5),
    ("train.grad_clip", -1), ("train.grad_clip", ".nan"), ("train.seed", -1), ("train.max_nonfinite", 0),
    ("train.threads", -2),
    ("eval.every", -1), ("eval.batches", 0), ("eval.max_new_tokens", 0), ("eval.prompts", "['你好', ' ']"),
    ("checkpoint.every", -10), ("checkpoint.keep", 0), ("log.every", 0),
    ("out_dir", "''"),
]
SFT_BAD = [
    ("lora.r", 0), ("lora.alpha", 0), ("lora.dropout", 1.0), ("lora.dropout", -0.1), ("neftune_alpha", -5),
    ("neftune_alpha", ".inf"), ("freeze.first_layers", -1), ("data.max_len", 0), ("data.val_fraction", 1.0),
    ("data.val_fraction", ".nan"), ("data.path", "''"),
]
PRETRAIN_BAD = [("data.path", "''"), ("data.weights", "[-1]"), ("data.weights", "[0]"), ("model.init_from", "''")]


def _pretrain_recipe(tmp_path):
    recipe = {"model": {"preset": "tiny"}, "data": {"path": [str(tmp_path / "shards")]},
              "train": {"max_steps": 10}, "out_dir": str(tmp_path / "run")}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _sft_recipe(tmp_path):
    recipe = {"model": {"init_from": str(tmp_path / "model")}, "data": {"path": [str(tmp_path / "chat.jsonl")]},
              "out_dir": str(tmp_path / "sft")}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _key_named(key: str) -> str:
    return f"'{key}"  # also matches an item of a list key: 'data.weights[0]'


@pytest.mark.parametrize("key,value", SHARED_BAD + PRETRAIN_BAD, ids=lambda x: str(x))
def test_pretrain_rejects_bad_values(tmp_path, key, value):
    recipe = _pretrain_recipe(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_run_config(recipe, [f"{key}={value}"])
    msg = str(e.value)
    assert "\n" not in msg and str(recipe) in msg and _key_named(key) in msg, msg


@pytest.mark.parametrize("key,value", SHARED_BAD + SFT_BAD, ids=lambda x: str(x))
def test_sft_rejects_bad_values(tmp_path, key, value):
    recipe = _sft_recipe(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_sft_config(recipe, [f"{key}={value}"])
    msg = str(e.value)
    assert "\n" not in msg and str(recipe) in msg and _key_named(key) in msg, msg


def test_edge_values_that_are_allowed(tmp_path):
    cfg = load_run_config(_pretrain_recipe(tmp_path), ["train.min_lr_ratio=0", "train.min_lr_ratio=1",
                                                       "train.warmup_steps=0", "train.weight_decay=0",
                                                       "train.grad_clip=0", "train.beta1=0", "eval.every=0",
                                                       "checkpoint.every=0", "train.lr=1e-3"])
    assert cfg.train.grad_clip == 0 and cfg.eval.every == 0 and cfg.train.lr == 1e-3
    sft, _ = load_sft_config(_sft_recipe(tmp_path), ["neftune_alpha=0", "data.val_fraction=0", "lora.dropout=0"])
    assert sft.data.val_fraction == 0


@pytest.mark.parametrize("stage,key,value", [("pretrain", "train.lr", "-0.001"), ("pretrain", "train.max_steps", "0"),
                                             ("pretrain", "data.path", ""), ("sft", "train.batch_size", "0"),
                                             ("sft", "train.lr", "nan")])
def test_cli_exits_2_with_one_line(tmp_path, capsys, stage, key, value):
    recipe = _pretrain_recipe(tmp_path) if stage == "pretrain" else _sft_recipe(tmp_path)
    assert main([stage, "--config", str(recipe), "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zhllm: error:") and "\n" not in err and _key_named(key) in err, err


def test_sft_missing_init_from_directory_is_named(tmp_path, capsys):
    recipe = _sft_recipe(tmp_path)  # tmp_path/model does not exist
    (tmp_path / "chat.jsonl").write_text('{"prompt": "你好", "response": "你好！"}\n', encoding="utf-8")
    assert main(["sft", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.init_from" in err and "no such model directory" in err and "tokenizer" not in err, err


def test_a_partial_section_keeps_the_stages_own_defaults():
    """A recipe that sets two `train` keys keeps GRPO's defaults for the rest (constant lr, no warmup, no weight
    decay), not TrainSection's pretraining defaults (cosine, 100 warmup steps, weight decay 0.1)."""
    from zhllm.config import from_dict
    from zhllm.train.grpo import GrpoConfig
    from zhllm.train.config import TrainSection

    cfg = from_dict(GrpoConfig, {"train": {"lr": 1e-5, "max_steps": 10}, "eval": {"batches": 2}})
    default = GrpoConfig().train
    assert (cfg.train.lr, cfg.train.max_steps) == (1e-5, 10)
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.batch_size) == \
        (default.schedule, default.warmup_steps, default.weight_decay, default.batch_size) == ("constant", 0, 0.0, 4)
    assert (cfg.eval.every, cfg.eval.batches) == (0, 2)  # GRPO's eval default (off) survives too
    assert TrainSection().warmup_steps != default.warmup_steps  # the two defaults differ, so the test can fail
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        from_dict(GrpoConfig, {"train": {"warmup_steps": -1}})


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_a_whitespace_stop_string_is_allowed_and_an_empty_one_is_not(stage):
    """"\\n" is the commonest stop string; only "" (which would stop every answer at once) is a mistake."""
    from zhllm.config import from_dict
    from zhllm.train.grpo import GrpoConfig
    from zhllm.train.ppo import PpoConfig

    config = {"grpo": GrpoConfig, "ppo": PpoConfig}[stage]
    section = getattr(from_dict(config, {stage: {"stop_strings": ["\n", " ", "答案"]}}), stage)
    assert section.stop_strings == ["\n", " ", "答案"]
    with pytest.raises(ConfigError, match=rf"'{stage}.stop_strings\[1\]' must not be empty"):
        from_dict(config, {stage: {"stop_strings": ["\n", ""]}})
