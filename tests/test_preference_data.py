"""Preference data: the three record formats render as the chat template renders them, loss only on the final
reply, prompt truncation by whole turns, bad records counted with file:line, batches of chosen+rejected rows."""
import itertools
import json

import numpy as np
import pytest
import torch

from zhllm import ZhllmError
from zhllm.data.chat import IGNORE
from zhllm.data.preference import (PreferenceDataset, encode_pair, load_preference_pairs, parse_record)
from zhllm.tokenizer.load import load_tokenizer
from zhllm.train.dpo_loss import forward_logps

from conftest import shared_data

SYSTEM, Q1, A1, Q2 = "你是一个助手。", "你好", "你好！有什么可以帮你？", "北京是哪个国家的首都？"
GOOD, BAD = "北京是中国的首都。", "北京是日本的首都。"
# the same two-turn preference in every format
RECORDS = {
    "strings": {"system": SYSTEM, "history": [[Q1, A1]], "prompt": Q2, "chosen": GOOD, "rejected": BAD},
    "messages": {"chosen": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                            {"role": "assistant", "content": GOOD}],
                 "rejected": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                              {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                              {"role": "assistant", "content": BAD}]},
    "sharegpt": {"system": SYSTEM, "conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                                     {"from": "human", "value": Q2}],
                 "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
}
PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
          {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_renders_as_the_chat_template_with_loss_on_the_final_reply(tok, fmt):
    rec = parse_record(RECORDS[fmt])
    assert rec.prompt == PROMPT and (rec.chosen, rec.rejected) == (GOOD, BAD)
    (c_ids, c_labels), (r_ids, r_labels), dropped = encode_pair(tok, rec)
    assert dropped == 0
    for ids, labels, reply in [(c_ids, c_labels, GOOD), (r_ids, r_labels, BAD)]:
        want = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": reply}], tokenize=True,
                                       return_dict=False)
        assert ids == list(want)
        trained = [t for t in labels if t != IGNORE]
        assert tok.decode(trained) == reply + "<|im_end|>"  # not A1: the earlier reply is prompt here
        prompt_ids = tok.apply_chat_template(PROMPT, tokenize=True, return_dict=False, add_generation_prompt=True)
        assert labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)


def test_message_lists_with_a_separate_prompt_and_plain_string_records(tok):
    rec = parse_record({"prompt": [{"role": "user", "content": Q2}], "chosen": [{"role": "assistant", "content": GOOD}],
                        "rejected": [{"role": "assistant", "content": BAD}]})
    assert rec.prompt == [{"role": "user", "content": Q2}] and rec.chosen == GOOD
    rec = parse_record({"system": "", "history": [], "prompt": Q2, "chosen": GOOD, "rejected": BAD})
    assert rec.prompt == [{"role": "user", "content": Q2}]  # dpo_zh.jsonl's empty system is no system turn


def test_prompt_truncation_drops_whole_earliest_turns_and_keeps_the_system(tok):
    history = [[f"第{i}个问题：今天天气很好吗？", f"第{i}个回答：今天天气很好。"] for i in range(6)]
    rec = parse_record({"system": SYSTEM, "history": history, "prompt": Q2, "chosen": GOOD, "rejected": BAD})
    (full, _), _, _ = encode_pair(tok, rec)
    (ids, labels), (r_ids, _), dropped = encode_pair(tok, rec, max_prompt_len=len(full) // 2)
    assert 0 < dropped < 6
    kept = [{"role": "system", "content": SYSTEM}] + [
        {"role": r, "content": t} for q, a in history[dropped:] for r, t in (("user", q), ("assistant", a))]
    want = tok.apply_chat_template(kept + [{"role": "user", "content": Q2}, {"role": "assistant", "content": GOOD}],
                                   tokenize=True, return_dict=False)
    assert ids == list(want)
    prompt_len = next(i for i, t in enumerate(labels) if t != IGNORE)
    assert prompt_len <= len(full) // 2
    (ids2, _), _, dropped2 = encode_pair(tok, rec, max_len=len(r_ids))
    assert dropped2 == dropped and ids2 == ids  # max_len trims the same way, for the longer side
    from zhllm.data.chat import BadRecord
    with pytest.raises(BadRecord, match="too long"):
        encode_pair(tok, rec, max_prompt_len=len(full) // 2, overflow="skip")
    with pytest.raises(BadRecord, match="too long"):
        encode_pair(tok, rec, max_prompt_len=3)  # even the last question alone does not fit


def test_bad_records_are_counted_with_file_and_line(tmp_path, tok):
    good = {"prompt": Q2, "chosen": GOOD, "rejected": BAD}
    lines = [json.dumps(good, ensure_ascii=False),
             "{not json",
             json.dumps({"prompt": Q2, "chosen": GOOD}, ensure_ascii=False),
             json.dumps({"prompt": Q2, "chosen": GOOD, "rejected": GOOD + " "}, ensure_ascii=False),
             json.dumps({"chosen": [{"role": "user", "content": Q1}, {"role": "assistant", "content": GOOD}],
                         "rejected": [{"role": "user", "content": Q2}, {"role": "assistant", "content": BAD}]},
                        ensure_ascii=False),
             json.dumps({"prompt": Q2, "chosen": 5, "rejected": BAD}),
             json.dumps(RECORDS["sharegpt"], ensure_ascii=False)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs, stats = load_preference_pairs(tok, path)
    assert len(pairs) == 2 and stats.pairs == 2
    assert stats.formats == {"strings": 1, "sharegpt": 1}  # formats of the good records
    assert stats.bad.bad == {"invalid_json": 1, "missing field": 1, "chosen equals rejected": 1,
                             "chosen and rejected do not share their prompt turns": 1, "field is not text": 1}
    for line in (2, 3, 4, 5, 6):
        assert any(e.startswith(f"{path}:{line}: ") for e in stats.bad.examples), line
    assert f"{path}:4: chosen equals rejected" in stats.summary()
    with pytest.raises(ZhllmError, match=f"{path}:2"):
        load_preference_pairs(tok, path, strict=True)
    _, stats = load_preference_pairs(tok, path, max_len=10)  # too long is a length policy, never fatal
    assert stats.bad.bad["too long"] == 2


def _pairs(tok, n=5):
    recs = [{"prompt": f"{Q2}{'？' * k}", "chosen": GOOD + "很好" * k, "rejected": BAD} for k in range(n)]
    return [(c, r) for c, r, _ in (encode_pair(tok, parse_record(x)) for x in recs)]


def test_batches_put_chosen_then_rejected_rows_in_a_seeded_order(tok):
    pairs = _pairs(tok)
    ds = PreferenceDataset(pairs, seed=3, pad_id=0)
    b = ds.batch(2, 2)
    idx = ds.pair_indices(2, 2)
    assert b["input_ids"].shape[0] == 4
    for row, (i, side) in enumerate([(idx[0], 0), (idx[1], 0), (idx[0], 1), (idx[1], 1)]):
        ids, labels = pairs[i][side]
        assert b["input_ids"][row, :len(ids)].tolist() == ids and b["labels"][row, :len(ids)].tolist() == labels
        assert b["attention_mask"][row].sum() == len(ids) and (b["labels"][row, len(ids):] == IGNORE).all()
    # the order is a pure function of (seed, epoch, position): a new dataset object gives the same batches
    again = PreferenceDataset(pairs, seed=3, pad_id=0)
    assert all(torch.equal(ds.batch(s, 3)["input_ids"], again.batch(s, 3)["input_ids"]) for s in (0, 4, 9))
    assert sorted(ds.pair_indices(0, 5)) == list(range(5))  # each epoch is a permutation
    assert ds.pair_indices(0, 5) != PreferenceDataset(pairs, seed=4).pair_indices(0, 5)
    ds.ref_logps = np.arange(10, dtype=np.float64).reshape(5, 2)
    assert ds.batch(2, 2)["ref_logps"].tolist() == [2 * idx[0], 2 * idx[1], 2 * idx[0] + 1, 2 * idx[1] + 1]


def test_padded_batch_gives_each_rows_own_log_probs(tok, tiny_model_dir):
    from zhllm.model.io import load_model
    model = load_model(tiny_model_dir).eval()
    pairs = _pairs(tok, 4)
    ds = PreferenceDataset(pairs, seed=0)
    batch = ds.batch(0, 4)
    with torch.no_grad():
        together = forward_logps(model, batch)[0]
        alone = [forward_logps(model, ds.collate([i]))[0] for i in ds.pair_indices(0, 4)]
    want = torch.cat([torch.stack([a[0] for a in alone]), torch.stack([a[1] for a in alone])])
    assert torch.allclose(together, want, atol=1e-4)


def test_real_dpo_file_parses_with_auto_detect(tmp_path):
    src = shared_data("dpo/dpo_zh.jsonl")
    real_tok = load_tokenizer(shared_data("tokenizers/minimind"))
    head = tmp_path / "head.jsonl"
    with open(src, encoding="utf-8") as fh:
        head.write_text("".join(itertools.islice(fh, 150)), encoding="utf-8")
    pairs, stats = load_preference_pairs(real_tok, head)
    assert stats.records == 150 and stats.formats == {"strings": 150} and stats.pairs == 150, stats.summary()
    _, short = load_preference_pairs(real_tok, head, max_len=256)
    assert short.pairs + short.bad.bad["too long"] == 150 and 0 < short.pairs < 150
