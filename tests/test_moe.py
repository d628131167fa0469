"""`adaptkit moe`: mergekit-moe's YAML -> a Mixtral model, against mergekit 0.1.5's `mergekit-moe`
(its `build`, called in-process on CPU) on tiny Llama and Mistral models: every tensor bitwise equal
(tolerance 0, bf16 and fp32 alike) and config.json equal; the gate formulas written out; the output
loads in transformers' MixtralForCausalLM and runs; bad configs are one line; a failure leaves nothing.

mergekit writes transformers 5's fused expert tensors (`mlp.experts.gate_up_proj`, E × 2I × H, the
w1 rows then the w3 rows of each expert; `mlp.experts.down_proj`, E × H × I) and `mlp.gate`;
adaptkit writes the classic per-expert layout (`block_sparse_moe.experts.E.w1`), so the comparison
maps one onto the other.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adaptkit.errors import AdaptkitError
from adaptkit.merge.moe import build_moe, load_moe_config
from adaptkit.merge.moe_outputs import MIXTRAL
from builders import mergekit_moe, tiny_llama
from hostile import assert_one_line_error, run_cli
from text_models import save_tokenizer, vocab_size

router_name = MIXTRAL.router_name


def expert_name(layer: int, expert: int, w: str) -> str:
    """Mixtral's name of an expert's w1, w2 or w3."""
    return MIXTRAL.expert.format(layer=layer, expert=expert, proj=w)


PROMPTS = [{"positive_prompts": ["one two three", "red cat"]},
           {"positive_prompts": ["the dog sat on the mat"], "negative_prompts": ["good film"]},
           {"positive_prompts": ["nine ten eleven"]}]


def _mistral(seed: int):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab_size(), max_position_embeddings=64, sliding_window=16,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[Path]]:
    """Per architecture: a base (seed 0) and experts (seeds 1-3 for llama, 1-2 for mistral), each with the
    word-level tokenizer."""
    made = {}
    for arch, build in (("llama", lambda s: tiny_llama(s, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3,
                                                       pad_token_id=0)), ("mistral", _mistral)):
        made[arch] = []
        for seed in range(4 if arch == "llama" else 3):
            folder = tmp_path_factory.mktemp(f"{arch}{seed}")
            build(seed).save_pretrained(folder)
            save_tokenizer(folder)
            made[arch].append(folder)
    return made


def _config(paths: list[Path], mode: str, n: int = 2, prompts: bool | None = None, **extra) -> dict:
    """A config of the base and n experts, with their prompts unless the gates are random."""
    prompts = mode not in ("random", "uniform_random") if prompts is None else prompts
    experts = [{"source_model": str(paths[1 + i]), **(PROMPTS[i] if prompts else {})} for i in range(n)]
    return {"base_model": str(paths[0]), "gate_mode": mode, "experts": experts, **extra}


def _as_mergekit(ours: dict[str, torch.Tensor], layers: int, experts: int) -> dict[str, torch.Tensor]:
    """Our classic layout in mergekit's (transformers 5) names and fused expert tensors."""
    moved = {k: v for k, v in ours.items() if ".block_sparse_moe." not in k}
    for layer in range(layers):
        w = {name: [ours[expert_name(layer, e, name)] for e in range(experts)] for name in ("w1", "w2", "w3")}
        prefix = f"model.layers.{layer}.mlp"
        moved[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat(p) for p in zip(w["w1"], w["w3"])])
        moved[f"{prefix}.experts.down_proj"] = torch.stack(w["w2"])
        moved[f"{prefix}.gate.weight"] = ours[router_name(layer)]
    return moved


# (id, architecture, gate_mode, experts, seed, extra config)
PEER = [
    ("llama-hidden-bf16", "llama", "hidden", 2, None, {"dtype": "bfloat16"}),
    ("llama-hidden-3-experts-fp32", "llama", "hidden", 3, None, {"experts_per_token": 1}),
    ("llama-hidden_avg-fp16", "llama", "hidden_avg", 2, None, {"dtype": "float16"}),
    ("llama-cheap_embed-bf16", "llama", "cheap_embed", 3, None, {"dtype": "bfloat16"}),
    ("llama-random-seed-bf16", "llama", "random", 2, 7, {"dtype": "bfloat16"}),
    ("llama-uniform_random-seed", "llama", "uniform_random", 2, 3, {"prompts": True}),  # mergekit wants them here
    ("mistral-hidden-bf16", "mistral", "hidden", 2, None, {"dtype": "bfloat16", "architecture": "mixtral"}),
    ("mistral-cheap_embed", "mistral", "cheap_embed", 2, None, {}),
]


@pytest.mark.filterwarnings("ignore:.*does not use the experts' prompts")
@pytest.mark.parametrize("arch,mode,n,seed,extra", [r[1:] for r in PEER], ids=[r[0] for r in PEER])
def test_every_tensor_and_the_config_equal_mergekit(tmp_path, models, arch, mode, n, seed, extra):
    config = _config(models[arch], mode, n, **extra)
    theirs = mergekit_moe(config, tmp_path / "mergekit", seed)
    report = build_moe(load_moe_config(config), tmp_path / "ours", seed=seed)
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    expected = load_file(theirs / "model.safetensors")
    mapped = _as_mergekit(ours, 2, n)
    assert sorted(mapped) == sorted(expected)
    for name, tensor in expected.items():
        assert mapped[name].dtype == tensor.dtype, name
        assert torch.equal(mapped[name], tensor), name  # bitwise: tolerance 0
    drop = ("transformers_version",)
    mine, peer = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "ours", theirs))
    assert {k: v for k, v in mine.items() if k not in drop} == {k: v for k, v in peer.items() if k not in drop}
    assert report["seed"] == seed and report["tensors"] == len(ours)


@pytest.mark.parametrize("bits", [4, 8])
def test_base_loaded_in_4_or_8_bits_gives_mergekits_routers(tmp_path, caplog, bits):
    """mergekit-moe's --load-in-4bit / --load-in-8bit: the base's hidden pass quantized by bitsandbytes
    (transformers' BitsAndBytesConfig defaults), as mergekit loads it: every tensor bitwise equal, the
    routers different from the bfloat16 pass's (the option took effect) and close to them. (bitsandbytes'
    CPU 4-bit kernel needs rows of a multiple of its 64-entry blocks: a wider model than the others.)"""
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"wide{seed}")
        tiny_llama(seed, hidden_size=128, intermediate_size=256, vocab_size=vocab_size(), bos_token_id=2,
                   eos_token_id=3, pad_token_id=0).save_pretrained(paths[-1])
        save_tokenizer(paths[-1])
    config = _config(paths, "hidden", 2, dtype="bfloat16")
    flag = {f"load_in_{bits}bit": True}
    expected = load_file(mergekit_moe(config, tmp_path / "mergekit", **flag) / "model.safetensors")
    caplog.clear()
    report = run_cli("moe", _recipe(tmp_path, config), "-o", tmp_path / "ours", f"--load-in-{bits}bit", "--json")
    assert report.exit_code == 0, report.stderr
    # (bitsandbytes' 8-bit matmul logs a warning at every layer: kept out, as mergekit's own way of computing)
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes") and r.levelno >= 30]
    ours = _as_mergekit(load_file(tmp_path / "ours" / "model.safetensors"), 2, 2)
    assert sorted(ours) == sorted(expected) and all(torch.equal(ours[k], v) for k, v in expected.items())
    assert json.loads(report.stdout)["base_bits"] == bits  # and the card says how the routers were made:
    assert f"quantized to {bits} bits by bitsandbytes" in (tmp_path / "ours" / "README.md").read_text()
    build_moe(load_moe_config(config), tmp_path / "plain")
    assert "bitsandbytes" not in (tmp_path / "plain" / "README.md").read_text()
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    routers = [router_name(layer) for layer in range(2)]
    quantized = load_file(tmp_path / "ours" / "model.safetensors")
    assert any(not torch.equal(quantized[r], plain[r]) for r in routers)
    for r in routers:  # unit rows, each within a few degrees of the unquantized one
        assert (quantized[r].float() * plain[r].float()).sum(dim=1).min() > 0.9


def test_load_in_bits_refusals_are_one_line(tmp_path, models, monkeypatch):
    """--load-in-Nbit quantizes the base of a hidden pass: with another gate mode it would change nothing
    (mergekit ignores it), both at once are ambiguous (mergekit takes 4), a base bitsandbytes cannot run
    fails in it, and without bitsandbytes it cannot run; nothing is written."""
    hidden = _recipe(tmp_path, _config(models["llama"], "hidden", 2))
    random = _recipe(tmp_path, _config(models["llama"], "random", 2, prompts=False), "random.yml")
    for args, fragment in (((random, "--load-in-4bit"), "--load-in-4bit quantizes the base run for hidden-state gates"),
                           ((random, "--load-in-8bit", "--dry-run"), "gate_mode random runs no model"),
                           ((hidden, "--load-in-4bit", "--load-in-8bit"), "not both")):
        assert_one_line_error(run_cli("moe", *args, "-o", tmp_path / "out"), fragment)
    # bitsandbytes' CPU 4-bit kernel fails on rows of 32 entries on some CPUs (those with AVX-512, as in
    # mergekit) and runs them on others: its failure, made here on any CPU, is one line
    from bitsandbytes.nn import Linear4bit

    def kernel_fails(self, x):
        raise RuntimeError("bitsandbytes' kernel failed")
    with monkeypatch.context() as patch:
        patch.setattr(Linear4bit, "forward", kernel_fails)
        assert_one_line_error(run_cli("moe", hidden, "--load-in-4bit", "-o", tmp_path / "out"),
                              "--load-in-4bit: bitsandbytes cannot run this base quantized (bitsandbytes' kernel failed)")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # (an import of it fails)
    with pytest.raises(AdaptkitError, match="^--load-in-8bit needs bitsandbytes"):
        build_moe(load_moe_config(_config(models["llama"], "hidden", 2)), tmp_path / "out", base_bits=8)
    assert not (tmp_path / "out").exists()


def _recipe(folder: Path, config: dict, name: str = "moe.yml") -> Path:
    (folder / name).write_text(yaml.safe_dump(config))
    return folder / name


def test_expert_noise_and_residual_scale_equal_mergekit_under_one_seed(tmp_path, models):
    """w ← (w + noise_scale·N(0, 1)) and then w2 ← residual_scale·w2, noise drawn after the random gates."""
    config = _config(models["llama"], "random", 2)
    config["experts"][0].update(noise_scale=0.01, residual_scale=0.5)
    config["experts"][1].update(residual_scale=2.0)
    theirs = load_file(mergekit_moe(config, tmp_path / "mergekit", seed=11) / "model.safetensors")
    build_moe(load_moe_config(config), tmp_path / "ours", seed=11)
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    mapped = _as_mergekit(ours, 2, 2)
    assert all(torch.equal(mapped[k], v) for k, v in theirs.items())
    source = load_file(models["llama"][2] / "model.safetensors")
    assert torch.equal(ours[expert_name(1, 1, "w2")], 2.0 * source["model.layers.1.mlp.down_proj.weight"])
    plain = load_file(models["llama"][1] / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    noise = ours[expert_name(0, 0, "w1")] - plain
    assert 0.005 < noise.std().item() < 0.02  # N(0, 0.01²) over 2048 draws


def test_cheap_embed_gate_is_the_normalized_sum_of_the_prompts_embeddings(tmp_path, models):
    """v_e = Σ_{prompts} Σ_{tokens} E[token] (BOS first), v_e ← v_e − v_e(negative), each normalized;
    the same row for every layer."""
    from transformers import AutoTokenizer

    base = models["llama"][0]
    build_moe(load_moe_config(_config(models["llama"], "cheap_embed", 2, dtype="float32")), tmp_path / "o")
    gates = load_file(tmp_path / "o" / "model.safetensors")
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(base)

    def direction(prompts):
        v = sum(embed[tok("<s>" + p, add_special_tokens=False)["input_ids"]].sum(0) for p in prompts)
        return v / v.norm()

    want = [direction(PROMPTS[0]["positive_prompts"]),
            direction(PROMPTS[1]["positive_prompts"]) - direction(PROMPTS[1]["negative_prompts"])]
    want = torch.stack([w / w.norm() for w in want])
    for layer in range(2):
        torch.testing.assert_close(gates[router_name(layer)], want, rtol=1e-5, atol=1e-6)


def test_hidden_gate_of_layer_0_is_the_last_tokens_embedding(tmp_path, models):
    """The first layer's input is the embedding: for `hidden` (last position), W[0, e] is the mean over
    e's prompts of E[last token], normalized (computed in bfloat16, hence the tolerance)."""
    base = models["llama"][0]
    config = _config(models["llama"], "hidden", 2)
    config["experts"][1].pop("negative_prompts")
    build_moe(load_moe_config(config), tmp_path / "o")
    gate = load_file(tmp_path / "o" / "model.safetensors")[router_name(0)].float()
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    words = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    for e in range(2):
        v = torch.stack([embed[words[p.split()[-1]]] for p in PROMPTS[e]["positive_prompts"]]).mean(0)
        torch.testing.assert_close(gate[e], v / v.norm(), rtol=2e-2, atol=1e-2)


def test_output_runs_in_transformers_and_upcycling_keeps_the_dense_model(tmp_path, models):
    """With every expert the base's own MLP, any routing mixes f(x) with weights summing to 1 (Mixtral
    renormalizes its top-k), so the MoE's logits are the dense base's."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    base = models["llama"][0]
    config = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
              "experts": [{"source_model": str(base)}] * 4}
    build_moe(load_moe_config(config), tmp_path / "moe", seed=0)
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    ids = torch.tensor([[2, 5, 9, 11, 4]])
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
        torch.testing.assert_close(moe(ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_cli_json_report_and_dry_run(tmp_path, models):
    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(_config(models["llama"], "random", 2, prompts=True)))
    dry = run_cli("moe", recipe, "-o", tmp_path / "out", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["tensors"] == 2 * (6 + 1 + 2 * 3) + 3 and not (tmp_path / "out").exists()
    run = run_cli("moe", recipe, "-o", tmp_path / "out", "--seed", "5", "--dtype", "float16", "--json")
    assert run.exit_code == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["seed"], report["dtype"], report["gate_mode"]) == (5, "float16", "random")
    assert {"config.json", "tokenizer.json", "mergekit_moe_config.yml"} <= set(os.listdir(tmp_path / "out"))
    assert f"warning: {recipe}: gate_mode random does not use the experts' prompts" in dry.stderr.splitlines()
    assert load_file(tmp_path / "out" / "model.safetensors")[router_name(0)].dtype == torch.float16


def _bad(key: str, value):
    def edit(config: dict) -> dict:
        if key.startswith("experts."):
            config["experts"][0][key.split(".", 1)[1]] = value
        elif value is None:
            config.pop(key)
        else:
            config[key] = value
        return config
    return edit


# (id, edit of a valid hidden-mode config, fragment of the one line)
BAD = [
    ("unknown key", _bad("gate_mod", "hidden"), "unknown key in"),
    ("unknown expert key", _bad("experts.weight", 1), "'weight'"),
    ("no experts", _bad("experts", []), "experts must be a non-empty list"),
    ("no base", _bad("base_model", None), "'base_model' is missing"),
    ("unknown gate mode", _bad("gate_mode", "hiden"), "unknown gate_mode 'hiden'"),
    ("too few experts", _bad("experts_per_token", 3), "2 expert(s) but experts_per_token is 3"),
    ("experts_per_token 0", _bad("experts_per_token", 0), "experts_per_token must be an integer ≥ 1"),
    ("no prompts", _bad("experts.positive_prompts", None), "experts[0] has no positive_prompts"),
    ("prompts not a list", _bad("experts.positive_prompts", "hi"), "must be a list of strings"),
    ("noise not a number", _bad("experts.noise_scale", "big"), "noise_scale must be a finite number"),
    ("bad dtype", _bad("dtype", "int64"), "unknown dtype 'int64'"),
    ("unknown output", _bad("architecture", "gpt"), "unknown moe architecture 'gpt'"),
]


@pytest.mark.parametrize("edit,fragment", [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_configs_are_one_line(tmp_path, models, edit, fragment):
    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(edit(_config(models["llama"], "hidden", 2))))
    assert_one_line_error(run_cli("moe", recipe, "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_inputs_mergekit_refuses_are_one_line(tmp_path, models):
    from builders import tiny_gpt2

    same = _config(models["llama"], "cheap_embed", 2)
    same["experts"][1]["source_model"] = same["experts"][0]["source_model"]
    alike = _config(models["llama"], "cheap_embed", 2)
    alike["experts"][1] = {**alike["experts"][0], "source_model": alike["experts"][1]["source_model"]}
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    gpt2 = _config(models["llama"], "random", 2)
    gpt2["experts"][1]["source_model"] = str(tmp_path / "gpt2")
    mixed = _config(models["llama"], "random", 2)
    mixed["experts"][1]["source_model"] = str(models["mistral"][1])
    for config, fragment in ((same, "--allow-same-experts"), (alike, "same prompts"),
                             (gpt2, "is a gpt2 model; adaptkit moe"), (mixed, "the models mix llama and mistral")):
        with pytest.raises(AdaptkitError, match="^[^\n]*$") as caught:
            build_moe(load_moe_config(config), tmp_path / "out")
        assert fragment in str(caught.value)
    build_moe(load_moe_config(same, allow_same=True), tmp_path / "same")  # allowed on request, as in mergekit


def test_a_failure_midway_leaves_nothing_behind(tmp_path, models, monkeypatch):
    from adaptkit.merge import sources

    real = sources.ModelSource.get

    def failing(self, name, **kw):
        if name == "model.layers.1.mlp.down_proj.weight":
            raise AdaptkitError("disk gone")
        return real(self, name, **kw)

    monkeypatch.setattr(sources.ModelSource, "get", failing)
    with pytest.raises(AdaptkitError, match="disk gone"):
        build_moe(load_moe_config(_config(models["llama"], "random", 2)), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_random_gates_need_no_transformers_and_prompt_gates_say_so(tmp_path, models, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers -> ImportError
    build_moe(load_moe_config(_config(models["llama"], "random", 2)), tmp_path / "random")
    with pytest.raises(AdaptkitError, match=r"need transformers \(pip install 'adaptkit\[train\]'\)"):
        build_moe(load_moe_config(_config(models["llama"], "cheap_embed", 2)), tmp_path / "cheap")
    assert not (tmp_path / "cheap").exists()


def test_an_expert_with_a_lora_is_the_merged_model_as_stored(tmp_path, models):
    """An expert `model+lora` (mergekit-moe 0.1.5 refuses one: "LoRA not merged") over a bf16 model is that
    model with the LoRA merged in and stored in bf16, as `adaptkit merge` reads one (and mergekit's merges):
    PEFT's merge-and-unload, whose bf16 values a float32 output holds exactly."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(1, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3, pad_token_id=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "expert")
    torch.manual_seed(5)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    config = _config([models["llama"][0], models["llama"][2]], "random", 1, dtype="float32")
    config["experts"].insert(0, {"source_model": f"{tmp_path / 'expert'}+{tmp_path / 'lora'}"})
    build_moe(load_moe_config(config), tmp_path / "ours", seed=11)
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    merged = lora.merge_and_unload().state_dict()
    for layer in range(2):
        for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            got = ours[expert_name(layer, 0, w)]
            assert got.dtype == torch.float32
            assert torch.equal(got, merged[f"model.layers.{layer}.mlp.{proj}.weight"].float()), (layer, w)
