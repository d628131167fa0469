"""`adaptkit moe`'s DeepSeek, Qwen2-MoE and Qwen3-MoE outputs (adaptkit/merge/moe_outputs.py), with
shared experts, against mergekit 0.1.5's `mergekit-moe` on tiny Llama, Qwen2 and Qwen3 models: every
tensor bitwise equal, config.json equal as transformers reads it, the output chosen as mergekit's
`select_output_arch` chooses it. The Qwen outputs load in transformers with every tensor in place, and
a Qwen2-MoE layer computes its formula written out; bad configs are one line.

mergekit 0.1.5 opens only the base's and the experts' files, so in its runs the shared expert is the
base (another model fails there with AttributeError); adaptkit takes any model of the same type.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adaptkit.errors import AdaptkitError
from adaptkit.merge.moe import MoePlan, build_moe, load_moe_config
from adaptkit.merge.moe_outputs import OUTPUTS
from builders import mergekit_moe, tiny_llama
from hostile import assert_one_line_error, run_cli
from text_models import save_tokenizer, vocab_size

PROMPTS = [{"positive_prompts": ["one two three", "red cat"]},
           {"positive_prompts": ["the dog sat on the mat"], "negative_prompts": ["good film"]},
           {"positive_prompts": ["nine ten eleven"]}]
TOKENS = dict(vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3, pad_token_id=0)
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
#: What mergekit's DeepSeek config.json has besides adaptkit's: PretrainedConfig.to_dict()'s generic keys.
GENERIC = {"transformers_version", "_name_or_path", "torch_dtype", "id2label", "label2id", "return_dict",
           "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type"}


def _model(kind: str, seed: int):
    import transformers

    if kind == "llama":
        return tiny_llama(seed, **TOKENS)
    torch.manual_seed(seed)
    config = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind](**SIZES, **TOKENS)
    cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[kind]
    return cls(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[Path]]:
    """Per model type: four models (seeds 0-3), each with the word-level tokenizer."""
    made = {}
    for kind in ("llama", "qwen2", "qwen3"):
        made[kind] = []
        for seed in range(4):
            folder = tmp_path_factory.mktemp(f"{kind}{seed}")
            _model(kind, seed).save_pretrained(folder)
            save_tokenizer(folder)
            made[kind].append(folder)
    return made


def _config(paths: list[Path], mode: str, shared: int | None = None, prompts: bool = True, **extra) -> dict:
    """The base and experts 1 and 2; `shared`: which model is the shared expert (with prompts unless told)."""
    experts = [{"source_model": str(paths[1 + i]), **(PROMPTS[i] if mode != "random" else {})} for i in range(2)]
    config = {"base_model": str(paths[0]), "gate_mode": mode, "experts": experts, **extra}
    if shared is not None:
        config["shared_experts"] = [{"source_model": str(paths[shared]), **(PROMPTS[2] if prompts else {})}]
    return config


def _fused(tensors: dict[str, torch.Tensor], layers: int, experts: int) -> dict[str, torch.Tensor]:
    """Per-expert tensors in mergekit's (transformers 5's) fused Qwen3-MoE names."""
    moved = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        w = {p: [tensors[f"{prefix}.{e}.{p}.weight"] for e in range(experts)]
             for p in ("gate_proj", "up_proj", "down_proj")}
        moved[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat(p) for p in zip(w["gate_proj"], w["up_proj"])])
        moved[f"{prefix}.down_proj"] = torch.stack(w["down_proj"])
    return moved


def _meaning(folder: Path) -> dict:
    """config.json as transformers reads it (defaults filled in)."""
    from transformers import AutoConfig

    return {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items()
            if k not in ("transformers_version", "_name_or_path")}


# (id, model type, gate_mode, shared expert (a model index), its prompts, seed, extra config, output)
PEER = [
    ("qwen-llama-hidden-bf16", "llama", "hidden", 0, True, None, {"dtype": "bfloat16"}, "Qwen MoE"),
    ("qwen-qwen2-cheap_embed", "qwen2", "cheap_embed", 0, True, None, {}, "Qwen MoE"),
    ("qwen-qwen2-random-noise-fp16", "qwen2", "random", 0, False, 5, {"dtype": "float16", "noise": True}, "Qwen MoE"),
    ("qwen-llama-random-chosen", "llama", "random", 0, False, 2, {"architecture": "qwen m"}, "Qwen MoE"),
    ("deepseek-llama-random-noise", "llama", "random", 0, False, 3, {"noise": True}, "DeepSeek MoE"),
    ("deepseek-llama-hidden-bf16", "llama", "hidden", 0, False, None, {"dtype": "bfloat16"}, "DeepSeek MoE"),
    ("deepseek-no-shared", "llama", "cheap_embed", None, False, None, {"architecture": "DeepSeek"}, "DeepSeek MoE"),
    ("deepseek-uniform_random", "llama", "uniform_random", 0, False, 4, {"dtype": "float16"}, "DeepSeek MoE"),
    ("qwen-llama-hidden_avg", "llama", "hidden_avg", 0, True, None, {}, "Qwen MoE"),
    ("qwen3-cheap_embed-bf16", "qwen3", "cheap_embed", None, False, None, {"dtype": "bfloat16"}, "Qwen3 MoE"),
    ("qwen3-random-noise", "qwen3", "random", None, False, 7, {"noise": True}, "Qwen3 MoE"),
]


@pytest.mark.filterwarnings("ignore:.*both take this config")
@pytest.mark.parametrize("kind,mode,shared,prompts,seed,extra,output", [r[1:] for r in PEER], ids=[r[0] for r in PEER])
def test_every_tensor_and_the_config_equal_mergekit(tmp_path, models, kind, mode, shared, prompts, seed, extra, output):
    extra = dict(extra)
    noise = extra.pop("noise", False)
    config = _config(models[kind], mode, shared, prompts, **extra)
    if noise:  # drawn in each output's own order: Qwen2 down/gate/up, DeepSeek up/gate/down, Qwen3 per expert
        config["experts"][0].update(noise_scale=0.01, residual_scale=0.5)
        config["experts"][1].update(noise_scale=0.02)
        for entry in config.get("shared_experts", []):
            entry.update(noise_scale=0.03, residual_scale=2.0)
    theirs = mergekit_moe(config, tmp_path / "mergekit", seed)
    report = build_moe(load_moe_config(config), tmp_path / "ours", seed=seed)
    assert report["output_kind"] == output
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    expected = load_file(theirs / "model.safetensors")
    if output == "Qwen3 MoE":
        ours = _fused(ours, 2, 2)
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name  # bitwise: tolerance 0
    if output == "DeepSeek MoE":  # remote code: compared as written
        mine, peer = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "ours", theirs))
        # mergekit keeps the base's `dtype` and writes the output's as `torch_dtype` beside it (with dtype:
        # bfloat16, "float32" and "bfloat16"); adaptkit's `dtype` is the tensors'
        assert mine.pop("dtype") == peer.pop("torch_dtype") == str(ours["model.norm.weight"].dtype).split(".")[1]
        assert mine == {k: v for k, v in peer.items() if k not in GENERIC | {"dtype"}}
        assert mine["n_shared_experts"] == (None if shared is None else 1)
    else:
        assert _meaning(tmp_path / "ours") == _meaning(theirs)


def test_the_output_is_chosen_as_mergekit_chooses_it(models):
    """mergekit's `select_output_arch` on the same configs: Mixtral where it takes them, else the first
    that does; none where no output takes them (mergekit exits, adaptkit says why for each)."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import select_output_arch

    llama, qwen2, qwen3 = models["llama"], models["qwen2"], models["qwen3"]
    two_shared = _config(llama, "hidden", 0)
    two_shared["shared_experts"] *= 2
    cases = [_config(llama, "hidden"), _config(llama, "hidden", 0, prompts=False), _config(llama, "hidden", 0),
             _config(llama, "random", 0, prompts=False),
             _config(llama, "random", 0, prompts=False, architecture="qwen"),
             _config(llama, "uniform_random", 0, prompts=False), _config(llama, "hidden", 0, architecture="deepseek"),
             _config(llama, "hidden", architecture="qwen"), _config(llama, "hidden", architecture="DEEP"),
             _config(qwen2, "hidden"), _config(qwen2, "hidden", 0), _config(qwen2, "hidden", 0, prompts=False),
             _config(qwen3, "hidden"), _config(qwen3, "hidden", architecture="qwen"), _config(qwen3, "hidden", 0),
             two_shared]
    chosen = []
    for config in cases:
        try:
            theirs = select_output_arch(MoEMergeConfig.model_validate(config), MergeOptions()).name()
        except SystemExit:
            theirs = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (DeepSeek and Qwen both taking a config: the next test)
                ours = MoePlan(load_moe_config(config)).output.name
        except AdaptkitError as e:
            assert str(e).startswith("no mergekit-moe output takes this config: ") and "\n" not in str(e)
            ours = None
        assert ours == theirs, config
        chosen.append(ours)
    assert set(chosen) == {o.name for o in OUTPUTS} | {None}  # every output, and refusals, covered



def _mlp(weights: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """f(x) = W_down·(silu(W_gate·x) ⊙ W_up·x), a Llama MLP from its tensors."""
    g, u, d = (weights[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T


def test_qwen2_moe_loads_in_transformers_and_a_layer_computes_its_formula(tmp_path, models):
    """Llama experts and a shared expert of another model (mergekit needs it among its inputs) ->
    Qwen2MoeForCausalLM with no tensor missing or left over, q/k/v biases zeros, and its MoE block
    y = Σ_{e ∈ top-2} p̂_e·f_e(x) + σ(g·x)·f_s(x), p = softmax(W·x) renormalized over the top 2."""
    from transformers import Qwen2MoeForCausalLM

    llama = models["llama"]
    build_moe(load_moe_config(_config(llama, "hidden", shared=3, dtype="float32")), tmp_path / "moe")
    moe, info = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    written = load_file(tmp_path / "moe" / "model.safetensors")
    assert not written["model.layers.1.self_attn.k_proj.bias"].any()
    sources = [load_file(llama[i] / "model.safetensors") for i in (1, 2, 3)]
    for layer in range(2):
        for p in ("gate", "up", "down"):
            name = f"model.layers.{layer}.mlp.{p}_proj.weight"
            assert torch.equal(written[f"model.layers.{layer}.mlp.shared_expert.{p}_proj.weight"], sources[2][name])
            assert torch.equal(written[f"model.layers.{layer}.mlp.experts.1.{p}_proj.weight"], sources[1][name])
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    router = written["model.layers.1.mlp.gate.weight"]
    shared_gate = written["model.layers.1.mlp.shared_expert_gate.weight"]
    top = torch.softmax(x @ router.T, dim=-1).topk(2, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    experts = torch.stack([_mlp(s, "model.layers.1.mlp", x) for s in sources[:2]], dim=1)  # (tokens, 2, hidden)
    want = (weights[..., None] * experts.gather(1, top.indices[..., None].expand(-1, -1, 32))).sum(1)
    want = want + torch.sigmoid(x @ shared_gate.T) * _mlp(sources[2], "model.layers.1.mlp", x)
    with torch.no_grad():
        got = moe.model.layers[1].mlp(x[None])[0]
        assert torch.isfinite(moe(torch.tensor([[2, 5, 9, 11, 4]])).logits).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_qwen3_moe_upcycled_from_one_model_computes_what_it_does(tmp_path, models):
    """Every expert the base's own MLP: routing weights renormalized to 1 mix f(x) with itself, so the
    Qwen3-MoE's logits are the dense Qwen3's (q_norm and k_norm kept from the base)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    base = models["qwen3"][0]
    config = {"base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(base)}] * 4}
    build_moe(load_moe_config(config), tmp_path / "moe", seed=0)
    moe, info = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert not any(info.values()), info
    assert (moe.config.num_experts, moe.config.num_experts_per_tok, moe.config.norm_topk_prob) == (4, 2, True)
    ids = torch.tensor([[2, 5, 9, 11, 4]])
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
        torch.testing.assert_close(moe.eval()(ids).logits, dense, rtol=1e-5, atol=1e-5)


def _edit(**changes):
    def edit(config: dict) -> dict:
        for key, value in changes.items():
            if key == "shared_prompts":
                config["shared_experts"].append({"source_model": config["base_model"], **value})
            else:
                config[key] = value
        return config
    return edit


# (id, edit of a valid Qwen MoE config of Llama models, fragment of the one line)
BAD = [
    ("shared not a list", _edit(shared_experts={"source_model": "x"}), "shared_experts must be a list"),
    ("shared entry not a mapping", _edit(shared_experts=["x"]), "shared_experts[0] must be a mapping"),
    ("shared unknown key", _edit(shared_experts=[{"source_model": "x", "weight": 1}]), "unknown key in"),
    ("shared without source", _edit(shared_experts=[{"positive_prompts": ["a"]}]), "'source_model' is missing"),
    ("two shared experts", _edit(shared_prompts=PROMPTS[0]),
     "no mergekit-moe output takes this config: Mixtral takes no shared experts; DeepSeek MoE takes at most 1"),
    ("prompts for one shared of two", _edit(shared_prompts={}), "positive_prompts for every shared expert or for none"),
    ("deepseek with shared prompts", _edit(architecture="deepseek"), "DeepSeek MoE adds its shared expert ungated"),
    ("unknown architecture", _edit(architecture="mixtrall"), "unknown moe architecture 'mixtrall'"),
    ("architecture not a name", _edit(architecture=3), "architecture must be a name"),
]


@pytest.mark.parametrize("edit,fragment", [r[1:] for r in BAD], ids=[r[0] for r in BAD])
def test_bad_configs_are_one_line(tmp_path, models, edit, fragment):
    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(edit(_config(models["llama"], "hidden", shared=0))))
    assert_one_line_error(run_cli("moe", recipe, "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_inputs_no_output_takes_are_one_line(tmp_path, models):
    """Qwen2 models without a shared expert (mergekit: no output), a Qwen shared expert without prompts
    for hidden gates, and a shared expert whose MLP has another size."""
    tiny_llama(9, **{**TOKENS, "intermediate_size": 48}).save_pretrained(tmp_path / "narrow")
    narrow = _config(models["llama"], "hidden", shared=0)
    narrow["shared_experts"][0]["source_model"] = str(tmp_path / "narrow")
    for config, fragment in (
            (_config(models["qwen2"], "hidden"), "Mixtral takes llama or mistral models, not qwen2; DeepSeek MoE "
             "takes llama or mistral models, not qwen2; Qwen MoE takes exactly 1 shared expert; Qwen3 MoE takes qwen3"),
            (_config(models["qwen2"], "hidden", 0, prompts=False),
             "Qwen MoE gates its shared expert, which needs positive_prompts with gate_mode hidden"),
            (narrow, "shared expert {}: 'model.layers.0.mlp.down_proj.weight' has shape (32, 48), the base's "
             "config needs (32, 64)".format(tmp_path / "narrow"))):
        with pytest.raises(AdaptkitError, match="^[^\n]*$") as caught:
            build_moe(load_moe_config(config), tmp_path / "out")
        assert fragment in str(caught.value)
        assert not (tmp_path / "out").exists()


def test_dry_run_and_json_name_the_output(tmp_path, models):
    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(_config(models["llama"], "random", shared=0, prompts=False, architecture="qwen")))
    dry = run_cli("moe", recipe, "-o", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert dry.stdout.startswith("Qwen MoE with 2 experts + 1 shared (2 per token, gates random), 2 layers: ")
    run = run_cli("moe", recipe, "-o", tmp_path / "out", "--seed", "1", "--json")
    report = json.loads(run.stdout)
    assert (report["architecture"], report["output_kind"], report["seed"]) == ("Qwen2MoeForCausalLM", "Qwen MoE", 1)
    assert report["tensors"] == len(load_file(tmp_path / "out" / "model.safetensors"))
    assert report["shared_experts"] == [str(models["llama"][0])]


def test_the_card_says_what_was_built_and_no_card_writes_none(tmp_path, models):
    """README.md: tags, the output, each expert with its prompts and scales, the config as given
    (mergekit-moe writes no card); --no-card leaves out the card and the config copy, as merge's does."""
    config = _config(models["llama"], "hidden", shared=0, dtype="bfloat16")
    config["experts"][1].update(noise_scale=0.5, residual_scale=2.0)
    config["experts"][0]["positive_prompts"] = ["a | b", "red cat"]
    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(config))
    assert run_cli("moe", recipe, "-o", tmp_path / "out", "--seed", "0").exit_code == 0
    text = (tmp_path / "out" / "README.md").read_text()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    assert yaml.safe_load(front) == {"tags": ["moe", "merge", "adaptkit"], "library_name": "transformers"}
    assert body.startswith("\n# A Qwen MoE of 2 experts and 1 shared expert\n")
    assert f"| 0 | `{models['llama'][1]}` | \"a \\| b\", \"red cat\" |  |  |  |" in body
    assert f"| 1 | `{models['llama'][2]}` | \"the dog sat on the mat\" | \"good film\" | 0.5 | 2 |" in body
    assert f"| shared | `{models['llama'][0]}` | \"nine ten eleven\" |" in body
    assert body.endswith(f"## Config\n\n```yaml\n{recipe.read_text()}```\n")
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == recipe.read_text()
    assert run_cli("moe", recipe, "-o", tmp_path / "bare", "--seed", "0", "--no-card").exit_code == 0
    assert not {"README.md", "mergekit_moe_config.yml"} & set(os.listdir(tmp_path / "bare"))


def test_plot_draws_the_routers_and_json_reports_them(tmp_path, models):
    """--plot: the routers' picture (experts' similarity, per-layer conditions); --json carries the numbers:
    the similarity of a row with itself is 1, a layer is degenerate where its condition passes 5."""
    recipe = tmp_path / "moe.yml"
    recipe.write_text(yaml.safe_dump(_config(models["llama"], "cheap_embed", shared=0)))
    result = run_cli("moe", recipe, "-o", tmp_path / "out", "--plot", tmp_path / "routers.png", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    similarity, conditions = report["router_similarity"], report["router_conditions"]
    assert len(similarity) == 3 and all(row[i] == pytest.approx(1, abs=1e-4) for i, row in enumerate(similarity))
    assert len(conditions) == 2 and report["degenerate_layers"] == [i for i, c in enumerate(conditions) if c > 5]
    assert (tmp_path / "routers.png").stat().st_size > 5000
    for args, fragment in ((["--plot", tmp_path / "r.jpg"], "ends in .png or .svg"),
                           (["--plot", tmp_path / "r.png", "--dry-run"], "--dry-run computes none")):
        assert_one_line_error(run_cli("moe", recipe, "-o", tmp_path / "again", *args), fragment)
        assert not (tmp_path / "again").exists()


def test_the_card_names_the_hub_models_among_the_inputs(models):
    """A card's `base_model` lists the Hub repositories the MoE is made of (base, experts, shared, adapters),
    each once, never a local folder."""
    from adaptkit.merge.card import moe_card

    config = load_moe_config({"base_model": "org-a/base", "gate_mode": "random", "experts": [
        {"source_model": "org-b/chat+org-c/lora"}, {"source_model": str(models["llama"][1])}],
        "shared_experts": [{"source_model": "org-a/base@v2"}]})
    text = moe_card(config, {"output_kind": "DeepSeek MoE", "architecture": "DeepseekForCausalLM"}, None)
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == ["org-a/base", "org-b/chat", "org-c/lora"]
    assert meta["base_model_relation"] == "merge" and "## Config" not in text
    assert "| 0 | [org-b/chat](https://huggingface.co/org-b/chat) + [org-c/lora](https://huggingface.co/org-c/lora) |" \
        in text
