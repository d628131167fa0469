"""Adapters on quantized bases (QLoRA) and quantization-aware training (QAT)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import adaptkit
from adaptkit import registry
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.quant.quantized import QuantizedLinear, fake_quantize, load_quantized, quantize_model
from builders import tiny_llama
from text_models import bert_dir, counting, llama_dir, sentiment, vocab_size, write_jsonl

QUANTIZERS = registry.names("quantizer")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    return {"llama": llama_dir(root / "llama"), "bert": bert_dir(root / "bert"),
            "counting": write_jsonl(root / "counting.jsonl", counting()),
            "sentiment": write_jsonl(root / "sentiment.jsonl", sentiment())}


def causal_lm(folder, method=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    if method is None:
        return AutoModelForCausalLM.from_pretrained(folder)
    return load_quantized(folder, AutoModelForCausalLM, AutoConfig.from_pretrained(folder), method=method,
                          dtype=torch.float32)[0]


IDS = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 9, 10, 11, 12, 13]])


# -- the quantized layer ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", QUANTIZERS)
def test_quantized_linear_computes_with_the_dequantized_weight(method):
    torch.manual_seed(0)
    w, b = torch.randn(24, 40), torch.randn(24)
    layer = QuantizedLinear.from_weight(method, w, b)
    quantizer = registry.get("quantizer", method)
    w_hat = quantizer.dequantize(quantizer.quantize(w)).float()
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, w_hat, b), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ w_hat, rtol=1e-5, atol=1e-5)  # ∂L/∂x = ∂L/∂y · Ŵ
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.weight, w_hat)


def test_the_backward_keeps_no_dequantized_weight():
    layer = QuantizedLinear.from_weight("nf4", torch.randn(256, 256))
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(n < 256 * 256 for n in saved)


def test_layers_taking_turns_in_the_scratch_buffer_compute_with_their_own_weights():
    """Layers of different sizes unpack into one reused buffer (rows of whole blocks: bitsandbytes'
    kernel where installed); interleaved forwards and backwards each see their own Ŵ, the buffer is
    not re-made for a smaller layer, and a weight read through `.weight` is a tensor of its own."""
    from adaptkit.quant import quantized

    torch.manual_seed(1)
    big, small = (QuantizedLinear.from_weight("nf4", torch.randn(o, i).bfloat16()) for o, i in [(128, 256), (64, 128)])
    x_big, x_small = torch.randn(3, 256, requires_grad=True), torch.randn(3, 128, requires_grad=True)
    y_big, y_small = big(x_big.bfloat16()), small(x_small.bfloat16())
    buffer = quantized._SCRATCH.buffers[(torch.bfloat16, "cpu")]
    (y_big.float().sum() + y_small.float().sum()).backward()  # backwards in the other order, same buffer
    assert quantized._SCRATCH.buffers[(torch.bfloat16, "cpu")] is buffer and buffer.numel() >= 128 * 256
    for layer, x, y in ((big, x_big, y_big), (small, x_small, y_small)):
        w = layer.weight
        assert w.data_ptr() != buffer.data_ptr()
        torch.testing.assert_close(y, F.linear(x.bfloat16(), w))
        torch.testing.assert_close(x.grad, torch.ones_like(y).float() @ w.float(), rtol=1e-2, atol=1e-2)


def test_the_4bit_kernel_is_used_only_for_the_tested_bitsandbytes(monkeypatch):
    """Another bitsandbytes version (its C interface unknown) or none: the torch path, same bytes."""
    import importlib.metadata

    from adaptkit_plugins.quantizers import _fourbit_unpack as unpacking

    packed = registry.get("quantizer", "nf4").quantize(torch.randn(64, 128).bfloat16())
    expected = registry.get("quantizer", "nf4").dequantize(packed)
    for version in ("0.49.0", "0.51.0"):
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: v)
        unpacking._library.cache_clear()
        unpacking._kernel.cache_clear()
        assert unpacking._library() is None and unpacking._kernel("nf4", torch.bfloat16) is None
        assert torch.equal(registry.get("quantizer", "nf4").dequantize(packed), expected)
    monkeypatch.undo()
    unpacking._library.cache_clear()
    unpacking._kernel.cache_clear()
    assert unpacking._kernel("nf4", torch.bfloat16) is not None  # bitsandbytes 0.50 is the pinned test dependency


def test_loading_quantized_equals_quantizing_the_loaded_model(env):
    """The streaming loader (linear layers never made in full precision) gives the same model as
    loading in float and quantizing after; the LM head stays float (as QLoRA keeps it)."""
    streamed, whole = causal_lm(env["llama"], "nf4"), causal_lm(env["llama"])
    assert quantize_model(whole, "nf4") == 14
    assert torch.equal(streamed(IDS).logits, whole(IDS).logits)
    plain = [p for p, m in streamed.named_modules() if isinstance(m, nn.Linear)]
    assert plain == ["lm_head"] and not any(t.is_meta for t in streamed.state_dict().values())


def test_a_new_head_is_initialized_and_listed(env):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(env["bert"])
    config.num_labels = 3
    model, new = load_quantized(env["bert"], AutoModelForSequenceClassification, config, method="int8",
                                dtype=torch.float32)
    assert new == ["classifier"]
    assert isinstance(model.classifier, nn.Linear) and 0.005 < model.classifier.weight.std() < 0.05
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantizedLinear)


# -- QLoRA ------------------------------------------------------------------------------------------
def lora_grads(model, seed=0):
    torch.manual_seed(seed)
    handle = adaptkit.inject(model, "lora", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return handle, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_gradients_match_the_float_base(env):
    """A QLoRA step's adapter gradients are exactly those of the float model whose weights are the
    dequantized ones, and close to those on the original float base."""
    _, quantized = lora_grads(causal_lm(env["llama"], "nf4"))
    dequantized_base = causal_lm(env["llama"])
    quantize_model(dequantized_base, "nf4")
    for module in dequantized_base.modules():  # back to nn.Linear holding Ŵ
        for name, child in module.named_children():
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.weight
                setattr(module, name, linear)
    _, reference = lora_grads(dequantized_base)
    _, original = lora_grads(causal_lm(env["llama"]))
    assert quantized.keys() == reference.keys() == original.keys() and len(quantized) == 28
    for name in quantized:
        torch.testing.assert_close(quantized[name], reference[name], rtol=1e-4, atol=1e-6)
    flat = lambda g: torch.cat([t.reshape(-1) for t in g.values()])  # noqa: E731
    q, o = flat(quantized), flat(original)
    assert F.cosine_similarity(q, o, dim=0) > 0.95
    assert (q - o).norm() / o.norm() < 0.3


@pytest.mark.parametrize("settings", [{"init_lora_weights": "pissa"}, {}])
def test_variants_that_move_the_base_weight_are_refused(env, settings):
    model = causal_lm(env["llama"], "nf4")
    variant = "lora" if settings else "delta_lora"
    with pytest.raises(AdaptkitError, match="quantized \\(nf4\\) base cannot hold"):
        adaptkit.inject(model, variant, r=2, target_modules=["q_proj"], **settings)
    assert not any(type(m).__name__ == "AdaptedLayer" for m in model.modules())  # nothing left behind


def test_merging_into_a_quantized_layer_rounds_again(env):
    model = causal_lm(env["llama"], "int8")
    handle, _ = lora_grads(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
        before = model(IDS).logits
        handle.merge()
        after = model(IDS).logits
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, QuantizedLinear)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_train_quantize_nf4_then_load_on_the_float_base(env, tmp_path, one_thread):
    out = tmp_path / "qlora"
    result = CliRunner().invoke(cli, ["-q", "train", "--base", str(env["llama"]), "--variant", "lora", "--set", "r=4",
                                      "--set", "lora_alpha=8", "--quantize", "nf4", "--data", str(env["counting"]),
                                      "--lr", "3e-2", "--max-steps", "10", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["args"]["quantize"] == "nf4"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.05
    # the adapter is a plain LoRA: on the quantized base it gives what it gave in training,
    # on the float base nearly that, and PEFT loads it
    quantized = causal_lm(env["llama"], "nf4")
    adaptkit.load_adapter(quantized, out)
    floating = causal_lm(env["llama"])
    adaptkit.load_adapter(floating, out)
    with torch.no_grad():
        q, f = quantized(IDS).logits, floating(IDS).logits
    assert (q - f).abs().max() < 0.1 * f.abs().max()
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(causal_lm(env["llama"]), out)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, f, rtol=1e-5, atol=1e-5)


def test_train_quantized_classification(env, tmp_path, one_thread):
    from adaptkit.train.loop import train

    report = train(env["bert"], "lora", env["sentiment"], tmp_path / "cls", settings={"r": 4}, quantize="nf4",
                   lr=5e-2, max_steps=3, progress=False)
    assert report["steps"] == 3
    saved = json.loads((tmp_path / "cls" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]


def test_unknown_quantizer_names_the_nearest(env, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--base", str(env["llama"]), "--variant", "lora", "--quantize", "nf5",
                                      "--data", str(env["counting"]), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "nf4" in result.output and len(result.output.strip().splitlines()) == 1


# -- QAT ----------------------------------------------------------------------------------------------
def test_fake_quantize_is_q_forward_identity_backward():
    w = torch.randn(8, 16, requires_grad=True)
    q = fake_quantize(w, "ternary")
    ternary = registry.get("quantizer", "ternary")
    assert torch.equal(q, ternary.dequantize(ternary.quantize(w.detach())))
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(w.grad, g)


def qat_toy(qat: str | None, method="ternary", steps=150):
    """A two-layer MLP taught a low-rank change by LoRA; returns the loss of the merged model
    after quantizing its weights with `method`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            layer.weight.add_(0.075 * torch.randn(layer.weight.shape[0], 2) @ torch.randn(2, layer.weight.shape[1]))
    x = torch.randn(512, 32)
    y = teacher(x).detach()
    handle = adaptkit.inject(model, "lora", target_modules=["0", "2"], r=4, lora_alpha=4)
    handle.quantization_aware(qat)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    handle.quantization_aware(None)
    merged = handle.merge_and_unload()
    quantize_model(merged, method, skip=())
    with torch.no_grad():
        return F.mse_loss(merged(x), y).item()


def test_qat_makes_the_quantized_merge_better():
    plain, aware = qat_toy(None), qat_toy("ternary")
    assert aware < 0.75 * plain, (aware, plain)


def test_qat_forward_is_the_quantized_merged_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    handle = adaptkit.inject(model, "lora", target_modules=["0"], r=2, init_lora_weights="gaussian")
    x = torch.randn(4, 16)
    handle.quantization_aware("int8")
    y = model(x)
    layer = model[0]
    w = layer.base_layer.weight + layer.delta("default")
    int8 = registry.get("quantizer", "int8")
    expected = F.linear(x, int8.dequantize(int8.quantize(w)), layer.base_layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_qat_cli_and_activation_variants_refused(env, tmp_path, one_thread):
    result = CliRunner().invoke(cli, ["-q", "train", "--base", str(env["llama"]), "--variant", "lora", "--set", "r=4",
                                      "--qat", "int8", "--data", str(env["counting"]), "--max-steps", "2",
                                      "-o", str(tmp_path / "qat"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["args"]["qat"] == "int8"
    result = CliRunner().invoke(cli, ["-q", "train", "--base", str(env["llama"]), "--variant", "loreft",
                                      "--set", "layers=[0]", "--qat", "int8", "--data", str(env["counting"]),
                                      "--max-steps", "1", "-o", str(tmp_path / "reft")])
    assert result.exit_code == 1 and "cannot be merged" in result.output


# -- merging into a quantized base (adaptkit merge) ---------------------------------------------------
@pytest.fixture(scope="module")
def quantized_base(env, tmp_path_factory):
    from adaptkit.quant.quantize import run_quantize

    root = tmp_path_factory.mktemp("qbase")
    run_quantize(env["llama"], "nf4", root / "nf4", skip=["lm_head"], progress=False)
    model = causal_lm(env["llama"])
    torch.manual_seed(1)
    handle = adaptkit.inject(model, "lora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                             init_lora_weights="gaussian")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    handle.save(root / "adapter")
    deltas = {f"{layer.path}.weight": layer.delta("default") for layer, _ in handle._layers("default")}
    return {"base": root / "nf4", "adapter": root / "adapter", "deltas": deltas}


def test_merge_into_a_quantized_base_writes_bf16(quantized_base, tmp_path):
    from safetensors.torch import load_file

    from adaptkit.io.store import open_store
    from adaptkit.quant.unpacked import open_unpacked

    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["-q", "merge", "--base", str(quantized_base["base"]), "-m",
                                      str(quantized_base["adapter"]), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")
    base = open_unpacked(open_store(quantized_base["base"]))
    assert set(merged) == set(base.keys()) and "lm_head.weight" in merged
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (base.get(name) + quantized_base["deltas"][name]).to(torch.bfloat16)
    assert torch.equal(merged[name], expected)  # Ŵ + ΔW, rounded once
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[untouched], base.get(untouched).to(torch.bfloat16))


def test_merge_requantize_packs_again_and_reports_the_error(quantized_base, tmp_path):
    from adaptkit.files.inspection import inspect
    from adaptkit.io.store import open_store

    out = tmp_path / "requantized"
    result = CliRunner().invoke(cli, ["-q", "merge", "--base", str(quantized_base["base"]), "-m",
                                      str(quantized_base["adapter"]), "-o", str(out), "--requantize", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["requantized"]
    assert report["method"] == "nf4" and report["quantized"] == 15 and 0 < report["mean_error"] < 0.2
    assert inspect(out)["kind"] == "quantized-model"
    nf4 = registry.get("quantizer", "nf4")
    name = "model.layers.0.self_attn.q_proj.weight"
    with open_store(out) as store, open_store(quantized_base["base"]) as before:
        assert "lm_head.weight.absmax" not in store and store.info("lm_head.weight").dtype == "BF16"
        packed = {k.replace(name, "weight", 1): store.get(k) for k in store.keys() if k.startswith(name)}
        old = nf4.dequantize({k.replace(name, "weight", 1): before.get(k) for k in before.keys() if k.startswith(name)})
    merged = (old.float() + quantized_base["deltas"][name]).to(torch.bfloat16)
    expected = nf4.quantize(merged)
    assert packed.keys() == expected.keys()
    for key in packed:
        assert torch.equal(packed[key], expected[key]), key
    text = CliRunner().invoke(cli, ["-q", "merge", "--base", str(quantized_base["base"]), "-m",
                                    str(quantized_base["adapter"]), "-o", str(tmp_path / "again"), "--requantize"])
    assert "extra rounding error" in text.output


def test_requantize_needs_a_quantized_input(env, quantized_base, tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--base", str(env["llama"]), "-m", str(quantized_base["adapter"]),
                                      "-o", str(tmp_path / "x"), "--requantize"])
    assert result.exit_code == 1 and "no input is a quantized model" in result.output
    assert not (tmp_path / "x").exists()


def test_a_quantized_checkpoint_trains_and_evaluates_as_it_is(env, quantized_base, tmp_path, one_thread):
    """A folder `adaptkit quantize` wrote is a QLoRA base by itself: its packed layers are used as
    stored (equal to quantizing the float checkpoint while loading), and eval reads it too."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adaptkit.train.models import build_model

    packed, _ = build_model(quantized_base["base"], "causal-lm")
    streamed = causal_lm(env["llama"], "nf4")
    layer = packed.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.method == "nf4"
    assert torch.equal(layer.weight, streamed.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():  # embeddings were packed by PTQ: unpacked into the embedding table
        expected = registry.get("quantizer", "nf4").dequantize(registry.get("quantizer", "nf4").quantize(
            streamed.model.embed_tokens.weight))
        assert torch.equal(packed.model.embed_tokens.weight, expected)
    with pytest.raises(AdaptkitError, match="quantized with nf4; load it with that method, not int8"):
        load_quantized(quantized_base["base"], AutoModelForCausalLM, AutoConfig.from_pretrained(quantized_base["base"]),
                       method="int8", dtype=torch.float32)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["-q", "train", "--base", str(quantized_base["base"]), "--variant", "lora",
                                      "--set", "r=2", "--data", str(env["counting"]), "--max-steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["-q", "eval", str(quantized_base["base"]), "--adapter", str(out),
                                      "--data", str(env["counting"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["loss"] > 0


def test_parameter_counts_include_packed_weights(env):
    floating, quantized = causal_lm(env["llama"]), causal_lm(env["llama"], "nf4")
    a = adaptkit.inject(floating, "lora", r=2, target_modules="all-linear").trainable_parameters()
    b = adaptkit.inject(quantized, "lora", r=2, target_modules="all-linear").trainable_parameters()
    assert a == b


def test_gpt2_conv1d_layers_are_quantized_too(tmp_path):
    """GPT-2's Conv1D layers (weights stored in × out) are packed in math layout (out × in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from builders import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model, new = load_quantized(tmp_path / "gpt2", AutoModelForCausalLM, AutoConfig.from_pretrained(tmp_path / "gpt2"),
                                method="nf4", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert new == [] and quantize_model(reference, "nf4") == 8
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantizedLinear) and (attn.out_features, attn.in_features) == (96, 32)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    adaptkit.inject(model, "lora", r=2, target_modules=["c_attn"])
    assert model(ids).logits.shape == (1, 4, 128)


def test_a_bitsandbytes_quantization_config_is_dropped_from_unpacked_outputs(quantized_base, tmp_path):
    """A base saved by transformers with bitsandbytes carries `quantization_config`; a bf16 merge of it
    must not (transformers would act on it), a re-packed one keeps it."""
    import shutil

    base = tmp_path / "bnb-base"
    shutil.copytree(quantized_base["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(config))
    for flags, kept in (([], False), (["--requantize"], True)):
        out = tmp_path / f"out{len(flags)}"
        result = CliRunner().invoke(cli, ["-q", "merge", "--base", str(base), "-m", str(quantized_base["adapter"]),
                                          "-o", str(out), *flags])
        assert result.exit_code == 0, result.output
        assert ("quantization_config" in json.loads((out / "config.json").read_text())) is kept


def test_a_checkpoint_bitsandbytes_saved_through_transformers_loads_exactly(tmp_path):
    """transformers + bitsandbytes quantize on load (NF4, double quantization) and save; our loader
    takes those packed layers as they are and gives the same logits; QLoRA trains on it."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adaptkit.train.models import build_model

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    # rows of whole blocks: on AVX-512 CPUs bitsandbytes 0.50's C kernel unpacks other rows wrongly
    # (see _fourbit_unpack.py), and the shared test model's rows are 32 wide
    wide = tmp_path / "wide"
    tiny_llama(0, hidden_size=64, intermediate_size=128, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3,
               pad_token_id=0).save_pretrained(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(wide, quantization_config=config, dtype=torch.float32,
                                                      device_map="cpu")  # bitsandbytes' CPU kernel, as ours
    theirs.save_pretrained(tmp_path / "bnb")
    ours, _ = build_model(tmp_path / "bnb", "causal-lm")
    # on CPUs with AVX512-BF16, bitsandbytes' eval-mode forward repacks layers for another kernel (other
    # sums); in training mode it unpacks and multiplies as adaptkit does (no dropout here: eval logits)
    theirs.train()
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear) and layer.method == "nf4_dq"
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, theirs(IDS).logits)
