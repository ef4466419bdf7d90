"""The dense format: dense matrices, per-layer shapes, skipped blocks, dropped layers == the masked model."""

import pytest
import torch

import cusprun
from cusprun.formats.apply import apply
from cusprun.selection.plan import Geometry, propagate
from tests.tiny import random_ids, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def batch(vocab, seed=0, length=17):
    return [random_ids(length, vocab=vocab, seed=seed), random_ids(length, vocab=vocab, seed=seed + 1)]


def unit_plan(geo: Geometry, seed: int):
    """Layer 0 loses every head, layer 1 every channel, layer 2 everything; the others lose random units
    (query heads, whole k/v groups, channels, RoPE pairs: a different number per group, every pair of one
    group in the last layer) and random single neurons, so kept groups are uneven."""
    gen = torch.Generator().manual_seed(seed)
    plan = geo.full_plan()

    def k(layer, proj, side):
        return f"model.layers.{layer}.{proj}.{side}"
    for layer in range(geo.layers):
        heads = torch.rand(geo.kv, geo.rep, generator=gen) > 0.4
        heads[0, torch.randint(geo.rep, (1,), generator=gen)] = True
        if geo.kv > 1:
            heads[torch.randint(geo.kv, (1,), generator=gen)] = False  # a whole k/v group
        channels = torch.rand(geo.inter, generator=gen) > 0.4
        if layer in (0, 2):
            heads[:] = False
        if layer in (1, 2):
            channels[:] = False
        plan[k(layer, "self_attn.o_proj", "cols")] = heads[..., None].expand(-1, -1, geo.hd).flatten().clone()
        plan[k(layer, "mlp.down_proj", "cols")] = channels
        if layer >= 3:  # RoPE pairs: both k rows of (d, d + hd/2) in a k/v head
            pairs = torch.rand(geo.kv, geo.hd // 2, generator=gen) > 0.4
            if layer == geo.layers - 1:
                pairs[0] = False
            plan[k(layer, "self_attn.k_proj", "rows")] = pairs.repeat(1, 2).flatten()
        if layer >= 3:  # single neurons inside kept units: zeros in the dense matrices
            for proj, side in (("self_attn.q_proj", "rows"), ("self_attn.k_proj", "rows"),
                               ("self_attn.q_proj", "cols"), ("mlp.up_proj", "cols"), ("self_attn.o_proj", "rows")):
                plan[k(layer, proj, side)] &= torch.rand(geo.size(k(layer, proj, side)), generator=gen) > 0.1
    return propagate(plan, geo)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_computes_exactly_what_masked_computes(arch, seed):
    model = tiny_model(arch, seed=seed, layers=5)
    geo = Geometry(model.config)
    plan = unit_plan(geo, seed)
    dense, masked = apply(model, plan, "dense"), apply(model, plan, "masked")
    ids = batch(model.config.vocab_size, seed)
    assert (logits(dense, ids) - logits(masked, ids)).abs().max() <= 1e-4
    assert (logits(masked, ids) - logits(model, ids)).abs().max() > 1e-2  # the removal changed something
    # layer 2 lost everything: dropped; layer 0 has no attention, layer 1 no MLP; no projection gathers
    assert dense.config.cusprun_source_layers == [0, 1, 3, 4]
    layers = dense.model.layers
    narrowed = []
    assert layers[0].self_attn is None and layers[0].mlp is not None
    assert layers[1].mlp is None and layers[1].self_attn is not None
    for i, layer in enumerate(layers):
        cfg = dense.config.per_layer_config[i]
        if layer.self_attn is not None:  # q and k narrower where RoPE pairs went, v and o whole
            pairs = getattr(cfg, "cusprun_rope_pairs", None)
            qk_dim = geo.hd if pairs is None else 2 * len(pairs[0])
            if pairs is not None:
                narrowed.append(i)
            assert layer.self_attn.q_proj.weight.shape == (cfg.num_attention_heads * qk_dim, geo.hidden)
            assert layer.self_attn.k_proj.weight.shape == (cfg.num_key_value_heads * qk_dim, geo.hidden)
            assert layer.self_attn.v_proj.weight.shape == (cfg.num_key_value_heads * geo.hd, geo.hidden)
            assert layer.self_attn.o_proj.weight.shape == (geo.hidden, cfg.num_attention_heads * geo.hd)
        if layer.mlp is not None:
            assert layer.mlp.down_proj.weight.shape == (geo.hidden, cfg.intermediate_size)
    assert all(type(m) in (torch.nn.Linear,) for n, m in dense.named_modules() if n.endswith("_proj"))
    assert narrowed and min(narrowed) >= 2  # only source layers 3 and 4 lost RoPE pairs


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_dense_from_a_neuron_selection(arch):
    """Any plan, also the paper's per-neuron one: partial units stay, with zeros."""
    model = tiny_model(arch, seed=7, layers=3)
    scores = cusprun.score(model, [random_ids(n, seed=n) for n in (7, 12, 9)], progress=False)
    for ratio in (0.2, 0.5):
        plan = scores.select(ratio, granularity="neuron")  # the paper's selection, every projection
        ids = batch(model.config.vocab_size, seed=3)
        gap = logits(apply(model, plan, "dense"), ids) - logits(apply(model, plan, "masked"), ids)
        assert gap.abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_dense_generate_with_a_cache_sized_per_layer(arch):
    """Greedy decoding with the KV cache (longer than Mistral's sliding window) gives the masked model's tokens,
    and the cache holds each layer's own k/v heads."""
    model = tiny_model(arch, seed=2, layers=5)
    geo = Geometry(model.config)
    plan = unit_plan(geo, 3)
    dense, masked = apply(model, plan, "dense"), apply(model, plan, "masked")
    prompt = torch.tensor([random_ids(6, vocab=model.config.vocab_size, seed=9)])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got, want = dense.generate(prompt, **kw), masked.generate(prompt, **kw)
        assert torch.equal(got, want)
        out = dense(prompt, use_cache=True)
    for i, layer in enumerate(out.past_key_values.layers):
        heads = dense.config.per_layer_config[i].num_key_value_heads
        assert layer.keys.shape[1] == heads or (heads == 0 and layer.keys.shape[1] == layer.keys.shape[3] == 1)
        assert layer.get_seq_length() == prompt.shape[1]


def test_dense_config_uses_per_layer_config(tmp_path):
    model = tiny_model("llama", seed=1, layers=5)
    dense = apply(model, unit_plan(Geometry(model.config), 0), "dense")
    dense.save_pretrained(tmp_path)
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cusprun_dense_llama" and config["num_hidden_layers"] == 4
    assert config["per_layer_config"]["0"]["skip"] == ["self_attn"]
    assert config["per_layer_config"]["1"]["skip"] == ["mlp"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = batch(61)
    assert torch.equal(logits(loaded, ids), logits(dense, ids))


def test_dense_evaluated_in_inference_mode_then_trained():
    """Uneven query heads per k/v head, each k/v head with its own RoPE pairs: the dense model computes what the
    masked one computes, and index tables first made under inference mode (an evaluation) still serve a
    training forward and backward."""
    model = tiny_model("llama", seed=2, layers=2)  # 2 k/v heads of 3 query heads, head_dim 10
    geo = Geometry(model.config)
    plan = geo.full_plan()
    o_cols = plan["model.layers.0.self_attn.o_proj.cols"].view(geo.kv, geo.rep, geo.hd)
    o_cols[0, 1] = False  # k/v head 0 keeps 2 query heads, k/v head 1 keeps 3
    k_rows = plan["model.layers.0.self_attn.k_proj.rows"].view(geo.kv, 2, geo.hd // 2)
    k_rows[0, :, 1:3] = k_rows[1, :, 4] = False  # different pairs per k/v head
    dense = apply(model, propagate(plan, geo), "dense")
    assert any(getattr(c, "cusprun_kv_map", None) for c in dense.config.per_layer_config)
    assert any(getattr(c, "cusprun_rope_pairs", None) for c in dense.config.per_layer_config)
    ids = torch.tensor(batch(model.config.vocab_size))
    with torch.inference_mode():  # uneven groups with their own pairs: still the masked model
        gap = dense(ids).logits - apply(model, propagate(plan, geo), "masked")(ids).logits
        assert gap.abs().max() <= 1e-4
    dense.train()
    dense(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in dense.named_parameters() if n.endswith("q_proj.weight"))


def test_pairs_need_unit_granularity():
    model = tiny_model("qwen2", seed=1, layers=2)
    score_set = cusprun.score(model, batch(model.config.vocab_size), progress=False)
    with pytest.raises(ValueError, match="needs granularity='unit'"):
        score_set.select(0.2, granularity="neuron", neurons="mlp+pairs")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_keeps_the_source_dtype_and_device(dtype, device):
    """The expert is built where its source lives, in its dtype, without changing the default dtype; its
    matrices are the masked model's kept rows and columns, bit for bit."""
    model = tiny_model("llama", seed=2).to(device=device, dtype=dtype)
    geo = Geometry(model.config)
    plan = propagate(unit_plan(geo, seed=2), geo)
    out = apply(model, plan, "dense")
    assert {(p.dtype, p.device.type) for p in out.parameters()} == {(dtype, device)}
    assert torch.get_default_dtype() == torch.float32
    source = out.config.cusprun_source_layers[0]
    channels = plan[f"model.layers.{source}.mlp.down_proj.cols"].to(device)
    masked = apply(model, plan, "masked").model.layers[source].mlp.down_proj.weight
    assert 0 < int(channels.sum()) < channels.numel()
    assert torch.equal(out.model.layers[0].mlp.down_proj.weight, masked[:, channels])
