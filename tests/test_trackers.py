"""log.wandb / log.swanlab: in offline mode each writes its run files in the run directory, holding the same
numbers as metrics.jsonl; a resumed run continues the same tracker run; a missing package is a config error."""
import json

import pytest

from train_support import make_shards, write_recipe, run_inprocess
from zhllm.errors import ConfigError
from zhllm.train.metrics import read_metrics

wandb = pytest.importorskip("wandb")


@pytest.fixture
def run(tmp_path, tokenizer_dir, corpus, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    shards = make_shards(tmp_path / "shards", tokenizer_dir, corpus)
    return lambda *sets, name="run": run_inprocess(
        write_recipe(tmp_path / f"{name}.yaml", shards, tmp_path / name, max_steps=4),
        "eval.every=2", "checkpoint.every=2", "log.tracker_mode=offline", *sets)


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte file header, then LevelDB log blocks of 32 KiB whose
    records (4-byte CRC, 2-byte length, 1-byte type: full/first/middle/last) may be split across blocks."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # block trailer: zero padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir):
    """{step: {name: value}} of every offline run file of the run directory (read back as `wandb sync` would)."""
    history = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(items.pop("_step"), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
    return history


def swanlab_history(run_dir):
    """{step: {name: value}} of every offline run file, read with SwanLab's own reader (the one `swanlab sync` uses)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    history = {}
    for path in sorted((run_dir / "swanlog").glob("run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(path)
        for data in reader:
            record = Record()
            record.ParseFromString(data)
            if record.HasField("scalar"):
                history.setdefault(record.scalar.step, {})[record.scalar.key] = record.scalar.value.number
        reader.close()
    return history


def assert_holds_metrics(history, records):
    assert records
    for r in records:
        kind = r.get("kind", "train")
        logged = history[r["step"]]
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind"):
                assert logged[f"{kind}/{k}"] == pytest.approx(v, rel=1e-6), (r["step"], kind, k)


def test_offline_run_files_hold_the_metrics(run, tmp_path):
    pytest.importorskip("swanlab")
    run("log.wandb=true", "log.swanlab=true", "log.project=zh-test")
    run_dir = tmp_path / "run"
    records = read_metrics(run_dir)
    assert {r.get("kind", "train") for r in records} == {"train", "eval"}
    assert_holds_metrics(wandb_history(run_dir), records)
    assert_holds_metrics(swanlab_history(run_dir), records)
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert list((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert list((run_dir / "swanlog").glob(f"run-*-{ids['swanlab']}"))


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from zhllm.train.trackers import open_trackers
    pytest.importorskip("swanlab")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = SimpleNamespace(tensorboard=True, wandb=True, swanlab=True, tracker_mode="offline", project="p",
                          run_name="")
    ids = []
    for start, steps in ((0, (1, 2, 3)), (2, (3, 4))):  # died after step 3's log, resumed from step 2
        trackers = open_trackers(log, tmp_path, {"train": {"lr": 0.1}}, start)
        ids.append([t.id for t in trackers])
        for step in steps:
            for t in trackers:
                t.log({"step": step, "kind": "train", "loss": 1.0 / step})
        for t in trackers:
            t.close()
    assert ids[0][1:] == ids[1][1:]  # wandb and swanlab (TensorBoard has no run id)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3, 4]  # step 3 once: the died run's was purged
    for history in (wandb_history(tmp_path), swanlab_history(tmp_path)):
        assert {s: h["train/loss"] for s, h in history.items()} == {s: 1.0 / s for s in (1, 2, 3, 4)}
    # a fresh run in the same directory (its output was replaced) starts new tracker runs
    fresh = open_trackers(log, tmp_path, {}, start_step=0)
    assert [t.id for t in fresh][1:] != ids[0][1:]
    for t in fresh:
        t.close()


def test_missing_tracker_package_is_a_config_error(tmp_path, monkeypatch, tokenizer_dir, corpus):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "swanlab" else find_spec(name, *a))
    shards = make_shards(tmp_path / "shards", tokenizer_dir, corpus[:40])
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"r\.yaml.*: log\.swanlab is on but the swanlab package is not installed"):
        run_inprocess(recipe, "log.swanlab=true")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
