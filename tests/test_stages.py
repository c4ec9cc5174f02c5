"""Stage caching: skip when unchanged, re-run on a changed config or upstream, resume an interrupted stage."""
import pytest

from zhllm.pipeline.runner import StageRunner


def run_chain(tmp_path, calls, a_cfg=1, b_cfg=1, force=False):
    r = StageRunner(tmp_path, force=force, log=lambda m: None)

    def make(name):
        def fn(d):
            calls.append(name)
            (d / "out.txt").write_text(name)
            return {"name": name}
        return fn

    a = r.run("a", {"x": a_cfg}, [], make("a"))
    b = r.run("b", {"y": b_cfg}, [a.fingerprint], make("b"))
    return a, b


def test_second_run_skips_and_changes_rerun_downstream(tmp_path):
    calls = []
    run_chain(tmp_path, calls)
    assert calls == ["a", "b"]
    calls.clear()
    a, b = run_chain(tmp_path, calls)
    assert calls == [] and a.skipped and b.skipped and b.summary == {"name": "b"}
    run_chain(tmp_path, calls, b_cfg=2)
    assert calls == ["b"]
    calls.clear()
    run_chain(tmp_path, calls, a_cfg=2, b_cfg=2)
    assert calls == ["a", "b"]
    calls.clear()
    run_chain(tmp_path, calls, a_cfg=2, b_cfg=2, force=True)
    assert calls == ["a", "b"]


def test_interrupted_stage_keeps_its_directory_for_resume(tmp_path):
    r = StageRunner(tmp_path, log=lambda m: None)

    def crash(d):
        (d / "checkpoint").write_text("step 5")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        r.run("train", {"lr": 1}, [], crash)
    seen = []
    r.run("train", {"lr": 1}, [], lambda d: seen.append((d / "checkpoint").read_text()) or {})
    assert seen == ["step 5"]
    # a changed config starts from an empty directory instead of resuming a stale run
    with pytest.raises(RuntimeError):
        r.run("train2", {"lr": 1}, [], crash)
    fresh = []
    r.run("train2", {"lr": 2}, [], lambda d: fresh.append((d / "checkpoint").exists()) or {})
    assert fresh == [False]


def test_runner_removes_only_stage_directories_it_made_and_logs_progress(tmp_path):
    from zhllm.errors import ZhllmError
    logs = []
    r = StageRunner(tmp_path, log=logs.append, plan=["a", "b"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "thesis.txt").write_text("the user's")
    r.run("a", {}, [], lambda d: {})
    assert logs[0] == "[stage 1/2 a] running (elapsed 0m00s)" and logs[1].startswith("[stage 1/2 a] done in ")
    with pytest.raises(ZhllmError, match="not made by `zhllm pipeline`"):
        r.run("b", {}, [], lambda d: {})
    assert (tmp_path / "b" / "thesis.txt").read_text() == "the user's"
