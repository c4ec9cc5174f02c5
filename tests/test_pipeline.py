"""`zhllm pipeline` end to end on the built-in demo with a tiny override: every stage, caching, resume."""
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from zhllm.errors import ConfigError
from zhllm.pipeline import load_pipeline_config, run_pipeline

TINY = [
    "corpus.task_docs=40",
    "tokenizer.vocab_size=512",
    "tokenize.workers=1",
    "pretrain.model.preset=tiny",
    "pretrain.model.dim=64",
    "pretrain.model.n_layers=2",
    "pretrain.model.n_heads=4",
    "pretrain.model.n_kv_heads=2",
    "pretrain.model.ffn_dim=128",
    "pretrain.train.max_steps=6",
    "pretrain.train.compile=false",  # compiling is tested in test_train_resume; here it only costs time
    "pretrain.train.batch_size=4",
    "pretrain.train.seq_len=64",
    "pretrain.eval.every=3",
    "pretrain.checkpoint.every=3",
    "pretrain.log.progress=false",
    "pretrain.log.tensorboard=false",
    "sft.demo_conversations=60",
    "sft.recipe.train.max_steps=4",
    "sft.recipe.train.batch_size=4",
    "sft.recipe.train.seq_len=128",
    "sft.recipe.eval.every=2",
    "sft.recipe.checkpoint.every=2",
    "sft.recipe.log.progress=false",
    "sft.recipe.log.tensorboard=false",
    "dpo.prompts=12",
    "dpo.max_new_tokens=8",
    "dpo.recipe.train.max_steps=4",
    "dpo.recipe.train.batch_size=2",
    "dpo.recipe.train.seq_len=128",
    "dpo.recipe.data.val_fraction=0.2",
    "dpo.recipe.eval.every=2",
    "dpo.recipe.checkpoint.every=2",
    "dpo.recipe.log.progress=false",
    "dpo.recipe.log.tensorboard=false",
    "grpo.enabled=true",
    "grpo.prompts=8",
    "grpo.recipe.grpo.num_generations=2",
    "grpo.recipe.grpo.max_new_tokens=8",
    "grpo.recipe.train.max_steps=2",
    "grpo.recipe.train.batch_size=2",
    "grpo.recipe.train.seq_len=128",
    "grpo.recipe.checkpoint.every=1",
    "grpo.recipe.log.every=1",
    "grpo.recipe.log.progress=false",
    "grpo.recipe.log.tensorboard=false",
    "eval.tasks=4",
    "eval.max_new_tokens=8",
]
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def overrides(run_dir, *extra):
    return TINY + [f"out_dir={run_dir}", *extra]


def test_demo_pipeline_end_to_end_then_cached_then_partial_rerun(tmp_path):
    run = tmp_path / "demo"
    logs = []
    results = run_pipeline(DEMO, overrides(run), log=logs.append)
    assert set(results) == {"corpus", "clean", "tokenizer", "tokenize", "pretrain", "sft", "dpo", "grpo", "eval",
                            "report"}
    assert results["clean"]["report"]["docs_kept"] > 500
    assert (run / "tokenizer" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "tokenize" / "shards" / "meta.json").read_text())["vocab_size"] == 512
    # the tokenizer learns from the cleaned prose alone (less a held-out slice); the shards hold the task documents too
    assert 0 < results["tokenizer"]["chars_trained"] < results["clean"]["report"]["chars_out"]
    splits = results["tokenize"]["splits"]
    assert sum(s["documents"] for s in splits.values()) == results["clean"]["report"]["docs_kept"] + 40
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        ckpt = Path(results[stage]["checkpoint"])
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
        assert results[stage]["step"] == results[stage]["max_steps"]
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert set(ev) == {"pretrain", "sft", "dpo", "grpo"}
    assert results["grpo"]["started_from"] == "dpo"
    prompts = [json.loads(line) for line in (run / "grpo" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and all(p["prompt"] and p["answer"] for p in prompts)
    pairs = results["dpo"]["pairs"]
    assert pairs["sampled"] == pairs["wrong"] + pairs["right"] and pairs["pairs"] == (pairs["wrong"] or pairs["right"])
    assert (run / "dpo" / "run" / "reference_logps.npz").is_file()
    for m in ev.values():
        assert 0 < m["val_bpb"] < 20 and 0.0 <= m["task_accuracy"] <= 1.0 and m["tasks"] == 4
    # every answer carries its task's kind, and the per-kind tallies add up to the stage's accuracy
    from zhllm.demo import eval_tasks
    kind_of = {t.question: t.kind for t in eval_tasks(4, 0)}
    for stage, m in ev.items():
        rows = [json.loads(line) for line in (run / "eval" / f"answers_{stage}.jsonl").read_text().splitlines()]
        assert [r["kind"] for r in rows] == [kind_of[r["question"]] for r in rows]
        tallies = m["tasks_right_by_kind"]
        assert {k: n for k, (_, n) in tallies.items()} == dict(Counter(r["kind"] for r in rows))
        assert sum(right for right, _ in tallies.values()) == sum(r["correct"] for r in rows) == \
            round(m["task_accuracy"] * 4)
    # the eval table's pretrain row re-measures training's last periodic eval: same checkpoint, same windows
    # (training ran it in bf16 or fp32, the eval stage in fp32)
    from zhllm.train.metrics import read_metrics
    trained = [r for r in read_metrics(results["pretrain"]["run_dir"]) if r.get("kind") == "eval"][-1]
    assert trained["step"] == results["pretrain"]["step"]
    assert ev["pretrain"]["val_windows"] == trained["val_windows"]
    assert abs(ev["pretrain"]["val_loss"] - trained["val_loss"]) < 0.02
    report = (run / "report.md").read_text()
    assert "The pretrain row re-measures the training section's last val loss" in report
    for needle in ("## What ran", "## Evaluation", "| pretrain |", "| sft |", "| dpo |", "| grpo |", "zhllm chat",
                   ".png", "preference accuracy", "![dpo rewards]", "### grpo",
                   "started from the dpo model; rewards: exact",
                   "mean reward of the sampled answers", "![grpo reward]", "grpo/run/checkpoints",
                   "Right answers per task kind", "| kind | tasks | pretrain | sft | dpo | grpo |",
                   *(f"| {kind} | " for kind in ev["grpo"]["tasks_right_by_kind"])):
        assert needle in report
    for png in Path(results["pretrain"]["run_dir"]).glob("plots/*.png"):
        assert png.stat().st_size > 1000

    # a second run skips every stage
    logs.clear()
    run_pipeline(DEMO, overrides(run), log=logs.append)
    assert sum("up to date, skipped" in line for line in logs) == 10

    # touching the SFT config re-runs only SFT and what follows
    logs.clear()
    run_pipeline(DEMO, overrides(run, "sft.recipe.train.lr=5e-4"), log=logs.append)
    progress = (re.match(r"\[stage \d+/10 (\w+)\] running \(elapsed \d+m\d\ds\)$", line) for line in logs)
    ran = [m.group(1) for m in progress if m]
    assert ran == ["sft", "dpo", "grpo", "eval", "report"]

    # touching only the DPO recipe re-runs DPO and what follows
    logs.clear()
    run_pipeline(DEMO, overrides(run, "sft.recipe.train.lr=5e-4", "dpo.recipe.dpo.beta=0.2"), log=logs.append)
    ran = [m.group(1) for m in (re.match(r"\[stage \d+/10 (\w+)\] running", line) for line in logs) if m]
    assert ran == ["dpo", "grpo", "eval", "report"]

    # touching only the GRPO recipe re-runs GRPO and what follows
    logs.clear()
    run_pipeline(DEMO, overrides(run, "sft.recipe.train.lr=5e-4", "dpo.recipe.dpo.beta=0.2",
                                 "grpo.recipe.train.lr=2e-5"), log=logs.append)
    ran = [m.group(1) for m in (re.match(r"\[stage \d+/10 (\w+)\] running", line) for line in logs) if m]
    assert ran == ["grpo", "eval", "report"]


def test_the_tokenizer_learns_from_the_task_documents_only_when_asked(tmp_path):
    """Templated task text would take the demo vocabulary's merges (`，所以王老师更重` one token), so by default
    the tokenizer stage trains on the cleaned text alone; `tokenizer.task_docs` puts the task documents back."""
    trained = {}
    for with_tasks in (False, True):
        run = tmp_path / str(with_tasks)
        results = run_pipeline(DEMO, overrides(run, f"tokenizer.task_docs={str(with_tasks).lower()}"),
                               until="tokenizer", log=lambda line: None)
        trained[with_tasks] = results["tokenizer"]["chars_trained"]
        report_chars = results["clean"]["report"]["chars_out"]
        assert (trained[with_tasks] > report_chars) == with_tasks
    assert trained[True] > trained[False]


def test_a_change_to_the_demo_tasks_reruns_the_stages_that_used_them(tmp_path, monkeypatch):
    """A run cached with older task generators must not pair their documents with the new held-out questions."""
    from zhllm.demo import tasks
    logs = []
    for _ in range(2):
        run_pipeline(DEMO, overrides(tmp_path / "demo"), until="clean", log=logs.append)
    monkeypatch.setattr(tasks, "TASKS_VERSION", tasks.TASKS_VERSION + 1)
    run_pipeline(DEMO, overrides(tmp_path / "demo"), until="clean", log=logs.append)
    ran = [m.group(1) for m in (re.match(r"\[stage \d+/\d+ (\w+)\] running", line) for line in logs) if m]
    assert ran == ["corpus", "clean", "corpus", "clean"]


def test_killed_pipeline_resumes_pretraining(tmp_path):
    run = tmp_path / "demo"
    args = [sys.executable, "-m", "zhllm", "pipeline", str(DEMO), "--until", "pretrain"]
    for o in overrides(run):
        args += ["--set", o]
    env = {**os.environ, "ZHLLM_FAIL_AT_STEP": "3"}
    died = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode != 0
    assert (run / "pretrain" / "run" / "checkpoints" / "step_3").is_dir()
    env.pop("ZHLLM_FAIL_AT_STEP")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[stage 5/5 pretrain] resuming" in done.stdout
    assert "resumed from" in done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in (run / "pretrain" / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert steps[-1] == 6


def test_bad_pipeline_config_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntokeniser: {vocab_size: 10}\n")
    r = subprocess.run([sys.executable, "-m", "zhllm", "pipeline", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key 'tokeniser'" in r.stderr and "Traceback" not in r.stderr


def test_a_typo_in_a_recipe_fails_before_any_stage_runs(tmp_path):
    run = tmp_path / "demo"
    for key in ("pretrain.train.lrr", "sft.recipe.train.lrr", "dpo.recipe.train.lrr", "grpo.recipe.train.lrr"):
        r = subprocess.run([sys.executable, "-m", "zhllm", "pipeline", str(DEMO), "--set", f"out_dir={run}",
                            "--set", f"{key}=1"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"unknown key '{key}'" in r.stderr and "demo.yaml" in r.stderr
        assert not run.exists()
    # the recipes' own checks (ranges, validate) run at load time too, on the recipe as the stage will read it
    with pytest.raises(ConfigError, match=r"demo\.yaml.*'pretrain\.train\.seq_len' must be >= 2"):
        load_pipeline_config(DEMO, ["pretrain.train.seq_len=1"])
    with pytest.raises(ConfigError, match="sft.recipe: the sft model section takes exactly `init_from: DIR`"):
        load_pipeline_config(DEMO, ["sft.recipe.model.preset=tiny"])


def test_eval_stage_measures_the_windows_of_the_typed_pretrain_recipe(tmp_path, monkeypatch):
    import zhllm.eval.demo_tasks as demo_tasks
    from zhllm.pipeline.runner import StageRunner
    from zhllm.pipeline.stages import PipelineRun, evaluate
    seen = []
    monkeypatch.setattr(demo_tasks, "evaluate_pipeline_models",
                        lambda models, shards, out, cfg, seq_len, seed, batch_size, batches, log: seen.append(
                            (seq_len, batch_size, batches)) or {})
    results = {"pretrain": {"checkpoint": "p"}, "tokenize": {"path": "s"}}
    for extra, windows in ((["eval.val_batches=7"], (64, 4, 7)), ([], (64, 4, 2))):
        cfg, recipes = load_pipeline_config(DEMO, overrides(tmp_path, "pretrain.eval.batches=2", *extra))
        evaluate(PipelineRun(cfg, recipes, StageRunner(tmp_path, log=lambda m: None), results))
        assert seen.pop() == windows


def test_pretraining_stopped_by_sigterm_is_not_marked_done_and_the_next_run_resumes(tmp_path, monkeypatch, capsys):
    from zhllm.cli import main
    from zhllm.train.trainer import Trainer
    step = Trainer.train_step

    def step_then_sigterm(self):
        r = step(self)
        if self.state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does; the trainer saves and returns early
        return r

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    run = tmp_path / "demo"
    args = ["pipeline", str(DEMO), "--until", "eval"]
    for o in overrides(run, "pretrain.checkpoint.every=0"):
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pretrain stopped at step 3/6 (checkpoint saved); re-run the same command to resume" in err
    assert (run / "pretrain" / "run" / "checkpoints" / "step_3").is_dir()
    assert not (run / "pretrain" / "stage.json").exists() and not (run / "sft").exists()
    monkeypatch.undo()
    logs = []
    results = run_pipeline(DEMO, overrides(run, "pretrain.checkpoint.every=0"), until="pretrain", log=logs.append)
    assert any(line.startswith("[stage 5/5 pretrain] resuming") for line in logs)
    assert results["pretrain"]["step"] == 6 and not results["pretrain"]["stopped_early"]
    assert (run / "pretrain" / "stage.json").is_file()
