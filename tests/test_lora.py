"""LoRA via peft on zhllm's model: adapters interchangeable with peft + transformers, merging, QLoRA guard,
NEFTune and freezing."""
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zhllm.cli import main
from zhllm.errors import ZhllmError
from zhllm.model.config import ModelConfig
from zhllm.model.io import load_model, new_model, save_model
from zhllm.infer.decoder import can_fuse
from zhllm.model.io import model_from_state_dict
from zhllm.train.lora import (LORA_TARGETS, apply_lora, enable_neftune, folded_state_dict, freeze_params,
                              load_adapter, merge_lora, save_adapter)
from zhllm.train.parallel import Dist

VARIANTS = {
    "llama-tied": dict(arch="llama", tie_embeddings=True),
    "qwen2-untied-bias-rslora": dict(arch="qwen2", tie_embeddings=False, attention_bias=True),
}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, init_std=0.1)
    return ModelConfig(**{**base, **kw})


def ids(B=2, T=12, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def randomise_lora_b(model, seed=0):
    """LoRA B starts at zero (the adapter is a no-op); make it matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(params=list(VARIANTS))
def base_dir(request, tmp_path):
    return save_model(new_model(tiny_config(**VARIANTS[request.param]), seed=1), tmp_path / "base"), request.param


def test_zhllm_adapter_loads_in_peft_and_merges_to_the_same_logits(base_dir, tmp_path):
    base, variant = base_dir
    model = apply_lora(load_model(base), r=4, alpha=8, rslora="rslora" in variant)
    randomise_lora_b(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_dir=base)

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == str(base)
    assert sorted(cfg["target_modules"]) == sorted(LORA_TARGETS) and cfg["use_rslora"] == ("rslora" in variant)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in keys
    assert len(keys) == 2 * len(LORA_TARGETS) * 2  # A and B, 7 targets, 2 layers

    x = ids()
    with torch.no_grad():
        ours = model.eval()(x)
        hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        plain = hf(x).logits
        peft_logits = PeftModel.from_pretrained(hf, adapter).eval()(x).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(ours, peft_logits, atol=1e-4), (ours - peft_logits).abs().max()

    merged = merge_lora(base, adapter, tmp_path / "merged")
    with torch.no_grad():
        ours_merged = load_model(merged)(x)
        hf_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(x).logits
    assert torch.allclose(ours_merged, peft_logits, atol=1e-4)
    assert torch.allclose(hf_merged, peft_logits, atol=1e-4)
    assert not any("lora" in k for k in load_file(str(merged / "model.safetensors")))


def test_folded_state_is_a_plain_model_computing_what_the_adapter_does(base_dir):
    base, variant = base_dir
    model = apply_lora(load_model(base), r=4, alpha=8, rslora="rslora" in variant).eval()
    randomise_lora_b(model)
    x = ids()
    with torch.no_grad():
        want = model(x)
        folded = model_from_state_dict(model.config, folded_state_dict(model))
        assert can_fuse(folded) and not can_fuse(model)
        assert torch.allclose(folded(x), want, atol=1e-5), (folded(x) - want).abs().max()
        assert torch.equal(model(x), want)  # the LoRA model is left as it was
        for layer in model.modules():  # adapters disabled: the folded model is the base again
            if hasattr(layer, "enable_adapters") and hasattr(layer, "lora_A"):
                layer.enable_adapters(False)
        plain = load_model(base)(x)
        assert torch.allclose(model_from_state_dict(model.config, folded_state_dict(model))(x), plain, atol=1e-6)
    assert folded_state_dict(load_model(base)) is None  # no adapter: nothing to fold
    if variant == "llama-tied":  # a LoRA on a tied lm_head would change the embeddings too: not folded
        tied = apply_lora(load_model(base), r=4, alpha=8, target=["q_proj", "lm_head"])
        assert folded_state_dict(tied) is None


@pytest.fixture()
def one_process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Dist(rank=0, world=2)  # as a launched run sees itself, so wrap_model shards
    dist.destroy_process_group()


def test_sharded_lora_model_trains_after_a_reference_forward_and_unshards_to_the_whole_model(one_process_group):
    from zhllm.train.lora import adapters_disabled
    from zhllm.train.parallel import unsharded_copy, wrap_model
    model = apply_lora(new_model(tiny_config(tie_embeddings=False), seed=0), r=4, alpha=8)
    randomise_lora_b(model)
    whole = {k: v.clone() for k, v in folded_state_dict(model).items()}
    model = wrap_model(model, one_process_group, "fsdp", "bf16")
    # FSDP2 settles each group's gradient dtype at its first forward from the parameters then trainable: a first
    # forward with the adapters off (a DPO/GRPO reference) must still see the adapters as trainable
    with torch.no_grad(), adapters_disabled(model):
        model(ids())
    model(ids(seed=1)).float().logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    # what a rollout decodes from: a plain, whole copy (the shards gathered) folding to the same weights
    copy = unsharded_copy(model)
    folded = folded_state_dict(copy)
    assert folded is not None and set(folded) == set(whole)
    assert all(torch.equal(folded[k], whole[k]) for k in whole)
    assert can_fuse(model_from_state_dict(copy.config, folded))


def test_folding_a_plain_model_does_not_import_peft():
    # GRPO asks every rollout's policy for its folded state; a run without LoRA should not pay peft's import
    code = ("import sys, torch; from zhllm.model.io import new_model; from zhllm.model.config import ModelConfig; "
            "from zhllm.train.lora import folded_state_dict; "
            "m = new_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64), seed=0); "
            "assert folded_state_dict(m) is None; assert 'peft' not in sys.modules, 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_peft_saved_adapter_loads_into_zhllm(tmp_path):
    base = save_model(new_model(tiny_config(), seed=2), tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                               task_type="CAUSAL_LM"))
    randomise_lora_b(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    x = ids(seed=4)
    with torch.no_grad():
        ref = peft_model.eval()(x).logits
        got = load_adapter(load_model(base), tmp_path / "peft_adapter").eval()(x)
    assert torch.allclose(got, ref, atol=1e-4)


def test_only_lora_weights_train_and_gradients_reach_kv(tmp_path):
    model = apply_lora(new_model(tiny_config(), seed=0), r=4, alpha=8).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model(ids()).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["model.layers.0.self_attn.k_proj.lora_B.default.weight"].abs().sum() > 0
    assert grads["model.layers.1.self_attn.v_proj.lora_B.default.weight"].abs().sum() > 0


def test_lora_argument_errors_are_clear():
    with pytest.raises(ZhllmError, match=r"\['qkv'\] are not linear layers"):
        apply_lora(new_model(tiny_config()), target=["q_proj", "qkv"])
    with pytest.raises(ZhllmError, match="lora.r must be positive"):
        apply_lora(new_model(tiny_config()), r=0)
    with pytest.raises(ZhllmError, match="no LoRA config"):
        save_adapter(new_model(tiny_config()), "/nonexistent/adapter")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_qlora_on_cpu_is_a_one_line_error():
    with pytest.raises(ZhllmError) as e:
        apply_lora(new_model(tiny_config()), qlora=True)
    assert "CUDA" in str(e.value) and "\n" not in str(e.value)


def test_neftune_adds_noise_only_in_training():
    model = new_model(tiny_config(), seed=0)
    x = ids()
    with torch.no_grad():
        clean = model.eval()(x)
        handle = enable_neftune(model, alpha=5.0)
        assert torch.equal(model.eval()(x), clean)
        noisy = model.train()(x)
        handle.remove()
        assert not torch.allclose(noisy, clean, atol=1e-3)
        assert torch.equal(model.train()(x), clean)


def test_freeze_embeddings_and_first_layers():
    model = new_model(tiny_config(tie_embeddings=False), seed=0)
    total = sum(p.numel() for p in model.parameters())
    left = freeze_params(model, embeddings=True, first_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen and "lm_head.weight" not in frozen
    assert all(n in frozen for n, _ in model.model.layers[0].named_parameters(prefix="model.layers.0"))
    assert not any(n.startswith("model.layers.1.") for n in frozen)
    assert left == total - sum(model.get_parameter(n).numel() for n in frozen)
    with pytest.raises(ZhllmError, match="first_layers"):
        freeze_params(model, first_layers=3)


def test_lora_merge_cli(tmp_path, tiny_model_dir, capsys):
    model = apply_lora(load_model(tiny_model_dir), r=2, alpha=4, target=["q_proj", "o_proj"])
    randomise_lora_b(model)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_dir=tiny_model_dir)
    out = tmp_path / "merged"
    assert main(["lora", "merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    x = ids(B=1, T=8)
    with torch.no_grad():
        assert torch.allclose(load_model(out)(x), model.eval()(x), atol=1e-4)
    (tmp_path / "not_adapter").mkdir()
    assert main(["lora", "merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "not_adapter"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def test_lora_sft_steps_lower_the_assistant_loss_and_survive_merge(tmp_path, tiny_model_dir):
    """The pieces together: chat examples -> packed batch -> LoRA training -> adapter -> merged checkpoint."""
    import torch.nn.functional as F

    from zhllm.data.chat import IGNORE, encode_records
    from zhllm.data.sft_batches import SFTDataset
    from zhllm.tokenizer.load import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    recs = [{"instruction": f"第{k}题：今天天气怎么样？", "output": "今天天气很好，我们去公园散步吧！"}
            for k in range(8)]
    batch = SFTDataset(encode_records(tok, recs), seq_len=256, packing=True).batch(0, 2)

    def loss_of(m):
        logits = m(batch["input_ids"], segment_ids=batch["segment_ids"])
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)

    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_model_dir, train=True), r=8, alpha=16)
    enable_neftune(model, alpha=1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = loss_of(model.eval()).item()
    model.train()
    for _ in range(15):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    with torch.no_grad():
        after = loss_of(model.eval()).item()
    assert after < before - 0.5, (before, after)
    adapter = save_adapter(model, tmp_path / "adapter", base_model_dir=tiny_model_dir)
    merged = merge_lora(tiny_model_dir, adapter, tmp_path / "merged")
    with torch.no_grad():
        assert abs(loss_of(load_model(merged)).item() - after) < 1e-4
