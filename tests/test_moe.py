"""Mixture-of-experts models: transformers' Qwen2-MoE in both directions, dropless routing, training terms,
generation, and a pretraining run through the CLI."""
import json

import pytest
import torch

from train_support import make_shards, run_cli, run_inprocess, train_losses, write_recipe
from zhllm.model import moe as M
from zhllm.model.config import ModelConfig, MoEConfig
from zhllm.model.io import load_model, save_model
from zhllm.model.transformer import Transformer


def tiny_moe(norm_topk_prob=True, dense_layers=(), tie=False, vocab=96) -> ModelConfig:
    return ModelConfig(arch="qwen2_moe", vocab_size=vocab, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48,
                       tie_embeddings=tie, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16,
                                                         shared_expert_ffn_dim=24, norm_topk_prob=norm_topk_prob,
                                                         dense_layers=list(dense_layers)))


def zhllm_forward_with_routing(model, ids):
    with M.record_router_logits() as records, torch.enable_grad():
        logits = model(ids)
    return logits.detach(), [r[0].detach() for r in records]


@pytest.mark.parametrize("norm_topk_prob,dense_layers,tie", [(False, (), False), (True, (1,), True)])
def test_equal_to_transformers_qwen2_moe_both_ways(tmp_path, norm_topk_prob, dense_layers, tie):
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func
    cfg = tiny_moe(norm_topk_prob, dense_layers, tie)
    ours = Transformer(cfg).init_weights(seed=1)
    save_model(ours, tmp_path / "zh")
    on_disk = json.loads((tmp_path / "zh" / "config.json").read_text())
    assert on_disk["architectures"] == ["Qwen2MoeForCausalLM"] and on_disk["mlp_only_layers"] == list(dense_layers)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "zh" / "model.safetensors"), "pt") as f:  # the Hub's per-expert layout
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in f.keys()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "zh").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = theirs(ids, output_router_logits=True)
    logits, routers = zhllm_forward_with_routing(ours.eval(), ids)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    assert len(routers) == len(ref.router_logits) == cfg.n_layers - len(dense_layers)
    for mine, want in zip(routers, ref.router_logits):
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(M.load_balancing_loss(routers, 2), ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.aux_loss, load_balancing_loss_func(ref.router_logits, 4, 2))

    # transformers -> zhllm: a model transformers initialised and saved.
    torch.manual_seed(3)
    native = type(theirs)(theirs.config).eval()
    native.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.config.moe.norm_topk_prob == norm_topk_prob and loaded.config.tie_embeddings == tie
    with torch.no_grad():
        want = native(ids).logits
    torch.testing.assert_close(loaded(ids), want, atol=1e-5, rtol=0)


def test_routing_is_dropless_and_gradients_reach_every_used_expert():
    torch.manual_seed(0)
    cfg = tiny_moe()
    block = M.MoE(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():  # a router that sends almost every token to experts 0 and 1: a skewed load
        block.gate.weight[:2] += 3.0
    x = torch.randn(40, cfg.dim).abs()  # positive inputs: the raised router rows win
    logits, expert_ids, weights = block.route(x)
    assert expert_ids.shape == (40, 2) and all(len(set(row.tolist())) == 2 for row in expert_ids)
    out = block.experts(x, expert_ids, weights)
    # Written out token by token: every token gets exactly its top-k experts, however full they are.
    gu, down = block.experts.gate_up_proj, block.experts.down_proj
    for t in range(40):
        want = 0
        for k in range(2):
            e = int(expert_ids[t, k])
            g, u = (gu[e] @ x[t]).chunk(2)
            want = want + weights[t, k] * (down[e] @ (torch.nn.functional.silu(g) * u))
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    used = set(expert_ids.flatten().tolist())
    for e in range(4):
        reached = bool(gu.grad[e].abs().sum() > 0 and down.grad[e].abs().sum() > 0)
        assert reached == (e in used), e
    load = M.expert_load(logits, 2)
    assert float(load.sum()) == pytest.approx(1.0) and float(load[:2].sum()) > 0.6


def test_router_loss_terms_and_their_gradient():
    cfg = tiny_moe()
    model = Transformer(cfg).init_weights(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with M.record_router_logits() as records:
        model(ids)
    assert len(records) == 3
    with torch.no_grad():
        model(ids)  # inference passes record nothing
    assert len(records) == 3
    term, figures = M.router_loss_terms(records)
    logits = [r[0] for r in records]
    z = sum(torch.logsumexp(g, -1).square().mean() for g in logits) / 3
    assert figures["moe/z_loss"] == pytest.approx(float(z.detach()), rel=1e-5)
    per_layer = sum(M.load_balancing_loss([g], 2) for g in logits) / 3  # not pooled over layers as transformers
    assert figures["moe/aux_loss"] == pytest.approx(float(per_layer.detach()), rel=1e-5)
    want = 0.01 * per_layer + 0.001 * z
    assert float(term.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert sum(v for k, v in figures.items() if k.startswith("expert_load/L2/")) == pytest.approx(1.0)
    term.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_engine_decodes_a_moe_model_as_its_full_forward(tmp_path, tokenizer_dir):
    from zhllm.infer.decoder import can_fuse
    from zhllm.infer.engine import Engine
    from zhllm.tokenizer.load import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    model = Transformer(tiny_moe(vocab=len(tok), dense_layers=(2,))).init_weights(seed=2).eval()
    assert can_fuse(model)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("今天天气", "中华人民共和国成立于")]
    wanted = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            wanted.append(ids[len(prompt):])
    engine = Engine(model, tok)  # left-padded batch: the fused attention with the MoE module after it
    got = engine.generate_batch(prompts, max_new_tokens=8, stop_token_ids=[]).completions
    assert [c.token_ids for c in got] == wanted


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir, corpus):
    return make_shards(tmp_path_factory.mktemp("shards") / "s", tokenizer_dir, corpus)


def moe_recipe(path, shards, out_dir, **train):
    recipe = write_recipe(path, shards, out_dir, **train)
    import yaml
    data = yaml.safe_load(recipe.read_text())
    data["model"] = {"preset": "moe-tiny", "dim": 32, "n_heads": 4, "n_kv_heads": 2,
                     "moe": {"n_experts": 4, "top_k": 2, "expert_ffn_dim": 32}}
    recipe.write_text(yaml.safe_dump(data))
    return recipe


def test_moe_pretraining_logs_expert_load_and_resumes_exactly(tmp_path, shards, capsys):
    torch.set_num_threads(1)
    straight = moe_recipe(tmp_path / "a.yaml", shards, tmp_path / "a")
    run_inprocess(straight, "log.plots=true")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind", "train") == "train"]
    assert all("moe/aux_loss" in r and "moe/z_loss" in r for r in train)
    loads = [train[-1][f"expert_load/L1/E{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    assert (tmp_path / "a" / "plots" / "expert_load.png").is_file()
    assert load_model(tmp_path / "a" / "checkpoints" / "latest").config.moe.n_experts == 4

    crashed = moe_recipe(tmp_path / "b.yaml", shards, tmp_path / "b")
    died = run_cli(["pretrain", "--config", str(crashed)], env={"ZHLLM_FAIL_AT_STEP": "8"})
    assert died.returncode == 1, died.stderr[-2000:]
    run_inprocess(crashed, "log.plots=true", resume="auto")
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_lora_sft_on_a_moe_model_trains_the_experts_and_matches_peft_on_transformers(tmp_path, tokenizer_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.train.sft import run_sft
    base_dir = save_model(Transformer(tiny_moe(vocab=len(load_tokenizer(tokenizer_dir)))).init_weights(seed=4),
                          tmp_path / "base", tokenizer=tokenizer_dir)
    chats = [{"messages": [{"role": "user", "content": f"{a}加{b}等于几？"},
                           {"role": "assistant", "content": f"答案：{a + b}"}]}
             for a in range(1, 9) for b in range(1, 9)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))
    run_sft("tiny", [f"model.init_from={base_dir}", f"data.path={data}", f"out_dir={tmp_path / 'run'}",
                     "train.max_steps=4", "train.batch_size=4", "train.seq_len=48", "train.lr=1e-2", "eval.every=0",
                     "checkpoint.every=4", "log.progress=false", "log.tensorboard=false", "log.plots=false",
                     "lora.enabled=true", "lora.r=4", "lora.dropout=0"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_4"
    with safe_open(str(ckpt / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(".mlp.experts." in k for k in f.keys()) and any("shared_expert.up_proj" in k for k in f.keys())
    x = torch.randint(0, cfg_vocab(base_dir), (2, 10))
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ckpt / "adapter").eval()
    with torch.no_grad():
        want = hf(x).logits
        merged = load_model(ckpt)(x)
        before = load_model(base_dir)(x)
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)
    assert not torch.allclose(merged, before, atol=1e-3)


def cfg_vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_lora_dpo_on_a_moe_model_adapter_reference_equals_copy(tmp_path, tokenizer_dir):
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.train.dpo import run_dpo
    from zhllm.train.metrics import read_metrics
    torch.set_num_threads(1)
    base_dir = save_model(Transformer(tiny_moe(vocab=len(load_tokenizer(tokenizer_dir)))).init_weights(seed=5),
                          tmp_path / "base", tokenizer=tokenizer_dir)
    pairs = [{"prompt": f"请写一句话（{i}）", "chosen": "今天天气很好，我们去公园散步吧！", "rejected": "Hello, world."}
             for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    runs = {}
    for ref in ("copy", "adapter"):
        run_dpo("tiny", [f"model.init_from={base_dir}", f"data.path={data}", f"out_dir={tmp_path / ref}",
                         "train.max_steps=3", "train.batch_size=4", "train.seq_len=96", "train.lr=3e-3",
                         "train.precision=fp32", "train.threads=1", "eval.every=0", "checkpoint.every=3",
                         "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plots=false",
                         "lora.enabled=true", "lora.r=4", "lora.dropout=0", f"dpo.reference={ref}"])
        runs[ref] = [r for r in read_metrics(tmp_path / ref) if r.get("kind", "train") == "train"]
    for a, b in zip(runs["copy"], runs["adapter"]):  # disabling the adapter (experts' included) gives the reference
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and "moe/aux_loss" in a
    assert runs["copy"][-1]["rewards/margins"] != pytest.approx(0, abs=1e-6)


def test_mixtral_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM
    cfg = ModelConfig(arch="mixtral", vocab_size=80, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=16,
                      tie_embeddings=False, moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=16, n_shared_experts=0))
    ours = Transformer(cfg).init_weights(seed=6).eval()
    assert ours.model.layers[0].mlp.shared_expert is None
    save_model(ours, tmp_path / "zh")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "zh" / "model.safetensors"), "pt") as f:  # Mixtral's Hub names
        assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in f.keys()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "zh").eval()
    assert type(theirs) is MixtralForCausalLM
    ids = torch.randint(0, 80, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids, output_router_logits=True)
    logits, routers = zhllm_forward_with_routing(ours, ids)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(M.load_balancing_loss(routers, 2), ref.aux_loss, atol=1e-6, rtol=0)
    torch.manual_seed(7)
    native = MixtralForCausalLM(theirs.config).eval()
    native.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "hf")(ids), native(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="shared expert"):
        ModelConfig(arch="qwen2_moe", moe=MoEConfig(n_shared_experts=0))


def test_the_server_scheduler_decodes_a_moe_model_as_the_engine(tokenizer_dir):
    import threading

    from zhllm.infer.engine import Engine
    from zhllm.infer.prompts import encode_prompt
    from zhllm.infer.sampling import SamplingParams
    from zhllm.serve.scheduler import Request, Scheduler
    from zhllm.tokenizer.load import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    engine = Engine(Transformer(tiny_moe(vocab=len(tok))).init_weights(seed=8).eval(), tok)
    cases = [("今天天气", 12), ("机器学习是人工智能的一个分支", 5), ("春眠不觉晓", 9)]
    done = [threading.Event() for _ in cases]
    texts = [""] * len(cases)

    def sink(i):
        def on_event(event):
            if event.kind == "text":
                texts[i] += event.text
            else:
                done[i].set()
        return on_event
    scheduler = Scheduler(engine, max_batch=2, prefill_chunk=4)  # rows join and leave a running batch
    scheduler.start()
    try:
        scheduler.submit([Request(encode_prompt(tok, p), SamplingParams(temperature=0, max_new_tokens=n), sink(i))
                          for i, (p, n) in enumerate(cases)])
        assert all(d.wait(30) for d in done)
    finally:
        scheduler.stop()
    assert texts == [engine.generate(p, temperature=0, max_new_tokens=n) for p, n in cases]
