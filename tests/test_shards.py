"""Shard format and PackedTokenDataset: exact windows, seeded order, epochs, rank partition, mixing, errors."""
import json

import numpy as np
import pytest

from zhllm.cli import main
from zhllm.data.shard_dir import token_dtype, write_meta
from zhllm.data.shards import PackedTokenDataset, ShardDirectory, ShardWriter, build_meta
from zhllm.data.window_order import MIX_BLOCK
from zhllm.errors import ZhllmError

EOS = 0


def make_docs(n, lo=1, hi=300, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(lo, hi, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def write_dir(path, docs_per_shard, vocab=400, fingerprint="tok-a", val_docs=()):
    """A shard directory made directly with ShardWriter; returns the flat train stream it holds."""
    path.mkdir(parents=True)
    infos, stream = [], []
    for k, docs in enumerate(docs_per_shard):
        with ShardWriter(path, f"train-{k:05d}", token_dtype(vocab), EOS) as w:
            for d in docs:
                w.add_document(d, num_bytes=2 * len(d))
                stream += d + [EOS]
            infos.append(w.close())
    if val_docs:
        w = ShardWriter(path, "val-00000", token_dtype(vocab), EOS)
        for d in val_docs:
            w.add_document(d, num_bytes=1)
        infos.append(w.close())
    (path / "tokenizer").mkdir()
    write_meta(path, build_meta(vocab, EOS, fingerprint, infos, complete=True))
    return np.array(stream)


@pytest.fixture
def one_dir(tmp_path):
    stream = write_dir(tmp_path / "a", [make_docs(30, seed=1), make_docs(25, seed=2), make_docs(5, seed=3)])
    return tmp_path / "a", stream


def test_writer_files_and_meta_roundtrip(tmp_path):
    docs = make_docs(20)
    write_dir(tmp_path / "d", [docs], val_docs=[[5, 6]])
    d = ShardDirectory(tmp_path / "d")
    assert d.dtype == np.uint16 and d.vocab_size == 400 and d.eos_id == EOS
    for k, doc in enumerate(docs):
        assert d.document("train", k).tolist() == doc + [EOS]
    assert d.document("val", 0).tolist() == [5, 6, EOS]
    starts = np.cumsum([0] + [len(x) + 1 for x in docs])[:-1]
    assert d.doc_starts("train-00000").tolist() == starts.tolist()
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["splits"]["train"] == {"tokens": sum(len(x) + 1 for x in docs), "documents": 20,
                                       "bytes": sum(2 * len(x) for x in docs), "shards": 1}
    assert token_dtype(70_000) == np.uint32


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train-00000", np.uint16, EOS) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_ids_that_do_not_fit(tmp_path):
    with ShardWriter(tmp_path, "train-00000", np.uint16, EOS) as w:
        with pytest.raises(ZhllmError, match="out of range"):
            w.add_document([70_000])
        w.abort()


def test_windows_are_exact_and_every_token_is_a_target_once(one_dir):
    path, stream = one_dir
    L = 16
    ds = PackedTokenDataset([path], seq_len=L, shuffle=False)
    assert len(ds) == (len(stream) - 1) // L and ds.num_tokens == len(stream)
    for j in range(len(ds)):  # includes windows that cross shard files
        assert ds.window(j).tolist() == stream[j * L: j * L + L + 1].tolist()
    shuffled = PackedTokenDataset([path], seq_len=L, seed=3)
    def key(m):
        return sorted(map(tuple, m.tolist()))
    assert key(shuffled.batch(0, len(ds))) == key(ds.batch(0, len(ds)))  # a permutation of the same windows
    assert not np.array_equal(shuffled.batch(0, len(ds)), ds.batch(0, len(ds)))


def test_order_is_a_pure_function_of_seed_and_index(one_dir):
    path, _ = one_dir
    a = PackedTokenDataset([path], seq_len=8, seed=7)
    b = PackedTokenDataset([path], seq_len=8, seed=7)
    c = PackedTokenDataset([path], seq_len=8, seed=8)
    n = len(a)
    idx = [5 * n + 3, 2, n + 1, 0]  # random access, epochs out of order
    assert all(np.array_equal(a.window(i), b.window(i)) for i in idx)
    assert not np.array_equal(a.batch(0, n), c.batch(0, n))
    epoch0, epoch1 = a.batch(0, n).numpy(), a.batch(n, n).numpy()
    assert not np.array_equal(epoch0, epoch1)  # a new permutation each epoch ...
    def key(m):
        return sorted(map(tuple, m.tolist()))
    assert key(epoch0) == key(epoch1)  # ... of the same windows
    assert a.batch(n - 2, 4).shape == (4, 9)  # batches straddle the epoch boundary


def test_rank_partition_and_resume_with_another_world_size(one_dir):
    path, _ = one_dir
    ds = PackedTokenDataset([path], seq_len=8, seed=1)
    got, position = [], 0
    for world, b, steps in ((2, 3, 4), (3, 2, 5), (1, 4, 2)):  # "resumed" twice on different world sizes
        for _ in range(steps):
            got += [ds.rank_batch(position, r, world, b) for r in range(world)]
            position += world * b
    import torch
    assert torch.equal(torch.cat(got), ds.batch(0, position))
    assert ds.batch(0, 1).dtype == torch.int64


def test_several_dirs_without_weights_are_one_stream(tmp_path):
    s1 = write_dir(tmp_path / "a", [make_docs(10, seed=1)])
    s2 = write_dir(tmp_path / "b", [make_docs(10, seed=2)])
    ds = PackedTokenDataset([tmp_path / "a", tmp_path / "b"], seq_len=8, shuffle=False)
    both = np.concatenate([s1, s2])
    assert len(ds) == (len(both) - 1) // 8
    assert all(ds.window(j).tolist() == both[j * 8: j * 8 + 9].tolist() for j in range(len(ds)))


def test_mixing_weights_are_respected_and_random_access_is_consistent(tmp_path):
    write_dir(tmp_path / "a", [make_docs(40, lo=1, hi=100, seed=1)])
    write_dir(tmp_path / "b", [make_docs(40, lo=200, hi=300, seed=2)])
    dirs = [tmp_path / "a", tmp_path / "b"]
    ds = PackedTokenDataset(dirs, seq_len=8, weights=[3, 1], seed=5)
    n = 2 * MIX_BLOCK
    from_a = [bool((ds.window(i)[ds.window(i) != EOS] < 100).all()) for i in range(n)]
    assert sum(from_a) == 3 * MIX_BLOCK // 2  # exact per block
    assert 0.6 < np.mean(from_a[:256]) < 0.9  # and spread out, not in runs
    fresh = PackedTokenDataset(dirs, seq_len=8, weights=[3, 1], seed=5)
    for i in (n - 1, 17, MIX_BLOCK + 3):
        assert np.array_equal(fresh.window(i), ds.window(i))
    only_b = PackedTokenDataset(dirs, seq_len=8, weights=[0, 1])
    assert len(only_b) == len(PackedTokenDataset(dirs[1:], seq_len=8))
    assert all((only_b.window(i)[only_b.window(i) != EOS] >= 200).all() for i in range(50))


def test_properties(tmp_path):
    write_dir(tmp_path / "a", [make_docs(10)], val_docs=[[1, 2, 3], [4, 5, 6]])
    ds = PackedTokenDataset(tmp_path / "a", seq_len=2, split="val")
    assert ds.num_tokens == 8 and len(ds) == 3
    assert ds.bytes_per_token == pytest.approx(2 / 8)
    assert ds.vocab_size == 400 and ds.eos_id == EOS and ds.tokenizer_dir == tmp_path / "a" / "tokenizer"


def test_errors_are_clear(tmp_path, one_dir):
    path, _ = one_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZhllmError, match="not a token shard directory"):
        PackedTokenDataset([tmp_path / "empty"], seq_len=8)
    with pytest.raises(ZhllmError, match="not found"):
        PackedTokenDataset([tmp_path / "nope"], seq_len=8)
    with pytest.raises(ZhllmError, match="longer than"):
        PackedTokenDataset([path], seq_len=10_000)
    write_dir(tmp_path / "other", [make_docs(5)], fingerprint="tok-b")
    with pytest.raises(ZhllmError, match="different tokenizer_sha256"):
        PackedTokenDataset([path, tmp_path / "other"], seq_len=8)
    with pytest.raises(ZhllmError, match="2 mixing weights for 1"):
        PackedTokenDataset([path], seq_len=8, weights=[1, 2])
    with pytest.raises(ZhllmError, match="non-negative"):
        PackedTokenDataset([path], seq_len=8, weights=[-1])


def test_half_written_and_truncated_dirs_are_refused(tmp_path, one_dir):
    path, _ = one_dir
    half = tmp_path / "half"
    half.mkdir()
    (half / "train-00000.bin").write_bytes(b"\0\0")
    with pytest.raises(ZhllmError, match="half-written"):
        ShardDirectory(half)
    with open(path / "train-00001.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ZhllmError, match="train-00001.bin has 10 bytes"):
        PackedTokenDataset([path], seq_len=8)
    meta = json.loads((path / "meta.json").read_text())
    write_meta(path, {**meta, "complete": False, "progress": "1 of 2 parts done"})
    with pytest.raises(ZhllmError, match="not finished"):
        ShardDirectory(path)


def test_inspect_cli(tmp_path, capsys, one_dir):
    path, _ = one_dir
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zhllm: error:") and err.count("\n") == 1
