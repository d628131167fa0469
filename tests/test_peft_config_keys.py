"""Every field of PEFT 0.21's LoraConfig, IA3Config, VeraConfig and AdaLoraConfig, set to a value that is not
its default in a saved adapter_config.json: adaptkit loads the adapter with PEFT's outputs (and merges it
into the saved base as PEFT's `merge_and_unload`), or refuses it in one line naming the field. Never a
silently different number, never an error blaming the base model.

Rows are (id, PEFT config kwargs, edits to the saved JSON, expected): "same" (PEFT's outputs), "refused"
(the field named), "load" (PEFT's outputs live; merging refused naming the field) or "either" (a field
another part implements: whichever happens must be one of these).
Also: a LoRA rank above min(in, out) is valid, as in PEFT (ΔW = s·B·A has rank ≤ min(in, out) anyway).
"""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import state, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])
BIASED = dict(attention_bias=True)  # bias="all" / "lora_only" rows need biases to save
TARGETS = ["q_proj", "v_proj"]
BLAMES_BASE = re.compile(r"(different|wrong) base")

LORA_ROWS = [
    ("lora_alpha", {"lora_alpha": 3}, {}, "same"),
    ("use_rslora", {"use_rslora": True}, {}, "same"),
    ("rank_alpha_pattern", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 5}}, {}, "same"),
    ("lora_dropout", {"lora_dropout": 0.3}, {}, "same"),
    ("bias_all", {"bias": "all"}, {}, "same"),
    ("bias_lora_only", {"bias": "lora_only"}, {}, "same"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, {}, "same"),
    ("init_gaussian", {}, {"init_lora_weights": "gaussian"}, "same"),
    ("init_orthogonal", {}, {"init_lora_weights": "orthogonal"}, "same"),
    ("init_eva", {}, {"init_lora_weights": "eva"}, "same"),
    ("init_pissa", {}, {"init_lora_weights": "pissa"}, "refused:init_lora_weights"),
    ("init_olora", {}, {"init_lora_weights": "olora"}, "refused:init_lora_weights"),
    ("init_loftq", {}, {"init_lora_weights": "loftq"}, "refused:init_lora_weights"),
    ("init_corda", {}, {"init_lora_weights": "corda"}, "refused:init_lora_weights"),
    ("layers_to_transform", {"layers_to_transform": [1], "layers_pattern": "layers"}, {}, "same"),
    ("exclude_modules", {"exclude_modules": ["model.layers.0.self_attn.v_proj"]}, {}, "same"),
    ("fan_in_fan_out", {}, {"fan_in_fan_out": True}, "same"),
    ("use_dora", {"use_dora": True}, {}, "same"),
    ("lora_bias", {"lora_bias": True}, {}, "same"),
    ("loftq_config", {}, {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}, "same"),
    ("eva_config", {}, {"eva_config": {"rho": 2.0}}, "same"),
    ("corda_config", {}, {"corda_config": {"corda_method": "kpm"}}, "same"),
    ("lora_ga_config", {}, {"lora_ga_config": {"direction": "ArB2r"}}, "same"),
    ("runtime_config", {}, {"runtime_config": {"ephemeral_gpu_offload": True}}, "same"),
    ("megatron_core", {}, {"megatron_core": "somewhere.else"}, "same"),
    ("qalora_group_size", {}, {"qalora_group_size": 8}, "same"),
    ("velora_config", {"velora_config": {"num_groups": 4}}, {}, "same"),
    ("megatron_config", {}, {"megatron_config": {"tensor_model_parallel_size": 1}}, "refused:megatron_config"),
    ("use_qalora", {}, {"use_qalora": True}, "refused:use_qalora"),
    ("monteclora_config", {}, {"monteclora_config": {}}, "refused:monteclora_config"),
    ("layer_replication", {}, {"layer_replication": [[0, 2], [1, 2]]}, "refused:layer_replication"),
    ("use_bdlora", {}, {"use_bdlora": {"nblocks": 2}}, "refused:use_bdlora"),
    ("arrow_config", {}, {"arrow_config": {"top_k": 2}}, "refused:arrow_config"),
    ("kasa_config", {"kasa_config": {}}, {}, "refused:kasa_config"),
    ("ensure_weight_tying", {}, {"ensure_weight_tying": True}, "refused:ensure_weight_tying"),
    ("trainable_token_indices", {"trainable_token_indices": [3, 4]}, {}, "same"),
    ("trainable_token_indices_dict", {"trainable_token_indices": {"embed_tokens": [3, 4, 9]}}, {}, "same"),
    ("alora_invocation_tokens", {"task_type": "CAUSAL_LM"}, {"alora_invocation_tokens": [9, 3]},
     "either:alora_invocation_tokens"),
    ("target_parameters", {"target_modules": [], "target_parameters": ["self_attn.q_proj.weight"]}, {},
     "either:target_parameters"),
]
IA3_ROWS = [
    ("feedforward_modules", {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}, {},
     "same"),
    ("fan_in_fan_out", {}, {"fan_in_fan_out": True}, "same"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, {}, "same"),
    ("init_ia3_weights", {}, {"init_ia3_weights": True}, "same"),
    ("exclude_modules", {"exclude_modules": ["model.layers.0.self_attn.v_proj"]}, {}, "same"),
]
VERA_ROWS = [
    ("projection_prng_key", {"projection_prng_key": 7}, {}, "same"),
    ("save_projection_false", {"save_projection": False}, {}, "load:save_projection"),
    ("vera_dropout", {"vera_dropout": 0.2}, {}, "same"),
    ("d_initial", {"d_initial": 0.5}, {}, "same"),
    ("fan_in_fan_out", {}, {"fan_in_fan_out": True}, "same"),
    ("bias_all", {"bias": "all"}, {}, "same"),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, {}, "same"),
    ("init_weights", {}, {"init_weights": False}, "same"),
    ("layers_to_transform", {"layers_to_transform": [0], "layers_pattern": "layers"}, {}, "same"),
]
ADALORA_ROWS = [
    ("budget", {"init_r": 6, "target_r": 3, "tinit": 1, "tfinal": 2, "deltaT": 2, "beta1": 0.5, "beta2": 0.6,
                "orth_reg_weight": 0.1}, {}, "same"),
    ("rank_pattern", {}, "prune", "same"),
    ("lora_alpha", {"lora_alpha": 5}, {}, "same"),
    # PEFT's AdaLoRA layers read r, lora_alpha, lora_dropout and init_lora_weights (as a flag) only:
    ("use_rslora", {}, {"use_rslora": True}, "same"),
    ("lora_bias", {}, {"lora_bias": True}, "same"),
    ("alpha_pattern", {}, {"alpha_pattern": {"q_proj": 3}}, "same"),
    ("init_pissa", {}, {"init_lora_weights": "pissa"}, "same"),
    ("use_dora", {}, {"use_dora": True}, "refused:use_dora"),  # PEFT refuses it too
    ("kasa_config", {}, {"kasa_config": {}}, "refused:kasa_config"),  # PEFT ignores it here; refused all the same
]


def peft_model(kind: str, kwargs: dict):
    from peft import AdaLoraConfig, IA3Config, LoraConfig, VeraConfig, get_peft_model

    torch.manual_seed(11)
    base = tiny_llama(**BIASED)
    if kind == "ia3":
        config = IA3Config(**{"target_modules": TARGETS, "feedforward_modules": [], "init_ia3_weights": False,
                              **kwargs})
    elif kind == "vera":
        config = VeraConfig(**{"target_modules": TARGETS, "r": 4, "init_weights": False, **kwargs})
    elif kind == "adalora":
        config = AdaLoraConfig(**{"target_modules": TARGETS, "init_r": 4, "target_r": 2, "total_step": 10, **kwargs})
    else:
        config = LoraConfig(**{"target_modules": TARGETS, "r": 4, "lora_alpha": 8, "init_lora_weights": False,
                               **kwargs})
    model = get_peft_model(base, config)
    with torch.no_grad():  # every saved tensor non-trivial: biases, E, the tensors PEFT starts at zero
        for name, p in model.named_parameters():
            if p.requires_grad and any(part in name for part in ("bias", "lora_E", "lm_head", "lora_embedding",
                                                                 "trainable_tokens")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save(kind: str, kwargs: dict, edits, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_model(kind, kwargs)
        if edits == "prune":  # AdaLoRA's budget prunes ranks: rank_pattern records them
            model(IDS).logits.square().sum().backward()
            model.base_model.update_and_allocate(9)
            edits = {}
        model.save_pretrained(out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edits}))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def peft_outputs(adapter) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """PEFT's logits and merged state dict (None where PEFT refuses to merge: aLoRA)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(**BIASED), adapter).eval()
        found = logits(model)
        try:
            return found, model.merge_and_unload().state_dict()
        except NotImplementedError:
            return found, None


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "base"
    tiny_llama(**BIASED).save_pretrained(path)
    return path


def check_row(kind, kwargs, edits, expected, base, tmp_path):
    adapter = save(kind, kwargs, edits, tmp_path / "adapter")
    outcome, _, key = expected.partition(":")
    try:
        model = tiny_llama(**BIASED)
        ak.load_adapter(model, adapter)
        got = logits(model)
    except AdaptkitError as error:
        message = str(error)
        assert outcome in ("refused", "either"), f"refused: {message}"
        assert "\n" not in message and key in message and not BLAMES_BASE.search(message), message
        return
    assert outcome in ("same", "load", "either"), "loaded, but the field should have been refused"
    want, merged = peft_outputs(adapter)
    assert rel(got, want) < 1e-4
    try:
        run_merge({"merge_method": "task_arithmetic", "base_model": str(base),
                   "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}, tmp_path / "out", progress=False)
    except AdaptkitError as error:  # a live-only adapter (aLoRA) refuses merging by name, as PEFT
        said = "aLoRA" if merged is None else key
        assert outcome in ("load", "either") and "\n" not in str(error) and said in str(error), str(error)
        return
    assert outcome != "load", "merged, but merging should have been refused"
    assert merged is not None, "PEFT refuses to merge this adapter"
    out = state(tmp_path / "out")
    for name, tensor in merged.items():
        assert rel(out[name], tensor) < 1e-4 if tensor.norm() > 0 else torch.equal(out[name], tensor), name


@pytest.mark.parametrize("row", LORA_ROWS, ids=[r[0] for r in LORA_ROWS])
def test_lora_config_field(row, base, tmp_path):
    check_row("lora", *row[1:], base, tmp_path)


@pytest.mark.parametrize("row", IA3_ROWS, ids=[r[0] for r in IA3_ROWS])
def test_ia3_config_field(row, base, tmp_path):
    check_row("ia3", *row[1:], base, tmp_path)


@pytest.mark.parametrize("row", VERA_ROWS, ids=[r[0] for r in VERA_ROWS])
def test_vera_config_field(row, base, tmp_path):
    check_row("vera", *row[1:], base, tmp_path)


@pytest.mark.parametrize("row", ADALORA_ROWS, ids=[r[0] for r in ADALORA_ROWS])
def test_adalora_config_field(row, base, tmp_path):
    check_row("adalora", *row[1:], base, tmp_path)


def test_every_field_has_a_row():
    """The tables cover every field of the installed PEFT's configs (PeftConfig's own fields aside)."""
    from dataclasses import fields

    from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, VeraConfig

    common = {f.name for f in fields(PeftConfig)} | {"target_modules", "r", "init_lora_weights", "layers_pattern"}
    covered = {"lora": {r[0] for r in LORA_ROWS} | {"rank_pattern", "alpha_pattern", "bias"},
               "ia3": {r[0] for r in IA3_ROWS}, "vera": {r[0] for r in VERA_ROWS} | {"save_projection", "bias"},
               "adalora": {r[0] for r in ADALORA_ROWS} | {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1",
                                                          "beta2", "orth_reg_weight", "total_step"}}
    for kind, cls in (("lora", LoraConfig), ("ia3", IA3Config), ("vera", VeraConfig)):
        missing = {f.name for f in fields(cls)} - common - covered[kind]
        assert not missing, f"{kind}: no row for {sorted(missing)}"
    own = {f.name for f in fields(AdaLoraConfig)} - {f.name for f in fields(LoraConfig)}
    assert not own - covered["adalora"], sorted(own - covered["adalora"])


# -- a rank above min(in, out) ------------------------------------------------------------------------
def test_rank_above_the_layer_size_loads_and_merges_as_peft(base, tmp_path):
    """r = 40 on 32 × 32 projections, 32 → 16 k/v and a 128 × 32 embedding: valid in PEFT; the update still
    has rank ≤ 32."""
    adapter = save("lora", {"r": 40, "target_modules": ["q_proj", "k_proj", "embed_tokens"]}, {}, tmp_path / "adapter")
    model = tiny_llama(**BIASED)
    ak.load_adapter(model, adapter)
    want, merged = peft_outputs(adapter)
    assert rel(logits(model), want) < 1e-4
    run_merge({"merge_method": "task_arithmetic", "base_model": str(base),
               "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}, tmp_path / "out", progress=False)
    out = state(tmp_path / "out")
    original = tiny_llama(**BIASED).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):
        assert rel(out[name], merged[name]) < 1e-5 and rel(merged[name], original[name]) > 1e-3, name
    ours = tiny_llama(**BIASED)  # and the other way: adaptkit injects r = 40, PEFT loads it
    handle = ak.inject(ours, "lora", r=40, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    handle.save(tmp_path / "ours")
    assert rel(peft_outputs(tmp_path / "ours")[0], logits(ours)) < 1e-4
