"""Random mergekit recipes through mergekit 0.1.5 and `adaptkit merge`, side by side (issue 15).

The recipe sets of `mergekit_suite.py` are what people wrote; this draws recipes nobody wrote, from a
seed, to find the combinations they leave out: every method of both tools with its parameters as
scalars, gradients or `{filter, value}` lists, negative and zero-sum weights, slices, passthrough
frankenmerges with `scale`, `dtype` (float32, bfloat16, float16, float64, or none: inputs stored in float32,
bfloat16 and float16 promoted) and `out_dtype`, `model+lora` inputs, two-stage recipes; with --moe, mergekit-moe configs (every gate mode, prompts,
noise and residual scales, shared experts, experts per token, dtype, output architecture); with
--modules, vision-language merges (Gemma-3, Qwen2.5-VL) by `modules:`; with --tokenizers,
tokenizer sources (`base`, `union`, a model, written as strings or mergekit's reference mappings), the
`tokenizer:` block's tokens and padding, and chat templates, over models whose vocabularies differ; with
--arch, the merges on 25 other architecture families (4-layer stand-ins built by transformers: MoE, hybrid
convolution and state-space models, scalars among the tensors, an encoder), and with --arch --tokenizers or
--arch --moe the tokenizer recipes on nine of them and mergekit-moe over Qwen2 and Qwen3 experts; with --arch
--lora, `model+lora` inputs whose PEFT LoRAs adapt every linear layer (GPT-2's Conv1D, fused projections).
Each recipe runs through both tools as the suite runs them (`mergekit_suite.run_one`) and gets the
suite's status, refined where the tools differ on purpose:

  equal-by-token    the same tokens with the same rows, at other ids: mergekit numbers the tokens a
                    `union` adds in hash order (another order in each process), adaptkit the base first,
                    then the inputs as listed; methods that look at a whole tensor then see other row
                    orders in each mergekit run, so only the token rows are compared
  both-refused      both tools refused the recipe (mergekit's error and adaptkit's line are in the JSON)
  projector-order   only Qwen2.5-VL's projector MLP differs, under a gradient: mergekit's table lists its
                    tensors in both of the projector's two "layers" without a layer index, so both plans
                    write them and its task scheduler decides which gradient position each keeps (adaptkit:
                    the last layer's; adaptkit/merge/modules.py)
  strict-token      a `tokens:` entry names a token its model lacks: adaptkit checks every entry, mergekit
                    reads one only where some input lacks the token's row (or `force`), and else runs
  superset          mergekit refused it, or wrote a model transformers does not load whole, and adaptkit wrote
                    one it loads: mergekit-moe checks `uniform_random` gates as prompt-based ones, adaptkit as
                    `random` ones; a shared expert that is neither an expert nor the base fails in mergekit;
                    with --arch, mergekit's GPT-NeoX table asks for `attention.bias` buffers transformers 5 no
                    longer writes, its frankenmerges keep the donor's `layer_types` (which transformers then
                    refuses) or, for GTE, its layer count (the missing layers initialized at random), its DELLA
                    divides 0 by 0 on rows of one entry (Mamba's conv1d, [C, 1, K]: adaptkit keeps those with
                    probability `density`), and it fails on a GLM-4-MoE slice starting at an expert layer
  mergekit-nonfinite  the tensors that differ are NaN or Inf in mergekit's output and finite in adaptkit's: RAM+
                    with ε = 0 (a slice's ε rounded to 0.0), where mergekit's ρᵢ is 0/0 for an input with no unique
                    entry and adaptkit's λᵢ = 1 scales nothing (plugins/merges/ram.py)
  both-nonfinite    mergekit wrote NaN or Inf where adaptkit refused them (multislerp's ε = 1e-8 is 0 in
                    float16, so identical inputs give 0/0)
  other-dtype       mergekit wrote float32 where the recipe's dtype says otherwise (arcee_fusion, ramplus_tl,
                    karcher's scalar tensors; in two stages, the next stage then merges another input)
  config-dtype      equal or close tensors; mergekit's config.json names a dtype its tensors do not have (the
                    base's, or without a base one of the inputs' in set order, another from one process to
                    the next, where inputs stored in several dtypes are promoted); adaptkit's names its own
  row-order         the same tokens at other ids, and values that differ because the method looks at a
                    whole tensor (norms, sums, magnitude cuts, random draws) whose rows mergekit orders by
                    hash in that run: mergekit itself gives other values from one process to the next
  template-base     neither `base_model` nor `chat_template`: adaptkit's tokenizer keeps the first listed input's
                    chat template, mergekit's that of the input its set order (the process's hash seed) put first
  template          the built-in alpaca template, which mergekit renders with stray blank lines
  base-alias        `tokenizer: {source: base, tokens: ...}` (in any stage): mergekit adds the tokens to the base's own
                    tokenizer, so the base seems to have them (its padding rows, past its vocabulary);
                    adaptkit gives the base the row the entry names, or refuses an entry naming a model
                    that lacks the token (only the token rows differ)

Anything else that is not equal, close or refused by both is printed with its recipe. The models are
built once under benchmarks/_work/mergekit_fuzz/ (tiny Llamas, float32).

    .venv/bin/python benchmarks/mergekit_fuzz.py [--seed S] [--count N]
                                                 [--tokenizers | --moe | --modules | --lora] [--arch] [--json PATH]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mergekit_suite as suite  # noqa: E402

WORK = suite.ROOT / "_work" / "mergekit_fuzz"
SHAPE = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}
MODELS = {f"fz_{k}": {"family": "llama", "layers": 6, "seed": 300 + i, "config": dict(SHAPE, vocab_size=96)}
          for i, k in enumerate(["base", "a", "b", "c"])}
TOKENIZED = {  # vocabularies that differ: plain tokens, added ChatML tokens, padding rows, a smaller vocabulary
    "tk_base": (64, 64, []), "tk_chatml": (66, 64, ["<|im_start|>", "<|im_end|>"]),
    "tk_padded": (72, 64, ["<UNUSED_0>", "<UNUSED_1>", "<|im_end|>"]), "tk_small": (64, 60, ["<X>"])}
MODELS.update({name: {"family": "llama", "layers": 4, "seed": 310 + i, "config": dict(SHAPE, vocab_size=rows),
                      "tokenizer": {"vocab": vocab, "added": added}}
               for i, (name, (rows, vocab, added)) in enumerate(TOKENIZED.items())})
MODELS.update({  # the same Llamas stored in half precision, and a LoRA of the base (`model+lora`)
    "fz_a_bf16": dict(MODELS["fz_a"], dtype="bfloat16"), "fz_b_fp16": dict(MODELS["fz_b"], dtype="float16"),
    "fz_lora": {"kind": "lora", "base": "fz_base", "rank": 4, "seed": 320}})
MODELS.update({f"mx_{k}": {"family": "mistral", "layers": 4, "seed": 330 + i, "tokenizer": "chars"}  # MoE experts:
               for i, k in enumerate(["base", "a", "b", "c"])})                                  # prompts need one
MODELS.update({f"vl_{family}_{k}": {"family": family, "layers": 4, "seed": 340 + 3 * j + i}  # `modules:`
               for j, family in enumerate(["gemma3_vl", "qwen2_5_vl"]) for i, k in enumerate(["base", "a", "b"])})
# --arch: the same draws over other architecture families (the suite's stand-ins, four of each, 4 layers), with
# conditions on names found across them
ARCHES = ["mistral", "gpt2", "qwen2", "gemma2", "qwen3", "phi3", "gemma3", "mixtral", "starcoder2", "olmo2", "gpt_neox",
          "stablelm", "falcon", "granite", "cohere2", "gemma", "glm4", "glm4_moe", "lfm2", "phi", "apertus", "arcee",
          "mamba", "gte", "qwen3_moe"]
ARCH_MODELS = {f"ar_{family}_{k}": {"family": family, "layers": 4, "seed": 400 + 4 * i + j}
               for i, family in enumerate(ARCHES) for j, k in enumerate(["base", "a", "b", "c"])}
# --arch --tokenizers: the tokenizer draws over other families' stand-ins with the vocabularies of TOKENIZED (tied
# embeddings: Gemma, GPT-2, Cohere2, Mamba, StarCoder2; an LM-head bias: Phi; GPT-NeoX's embed_out)
TOKENIZER_ARCHES = ["gemma", "gpt2", "cohere2", "mamba", "starcoder2", "phi", "gpt_neox", "qwen3", "falcon"]
ARCH_MODELS.update({f"at_{family}_{name[3:]}": {"family": family, "layers": 2, "seed": 600 + 4 * i + j,
                                                "config": {"vocab_size": rows}, "tokenizer": {"vocab": vocab, "added": added}}
                    for i, family in enumerate(TOKENIZER_ARCHES)
                    for j, (name, (rows, vocab, added)) in enumerate(TOKENIZED.items())})
# --arch --moe: mergekit-moe configs over Qwen2 experts (its Qwen MoE output) and Qwen3 ones (Qwen3 MoE)
ARCH_MODELS.update({f"mq_{family}_{k}": {"family": family, "layers": 4, "seed": 700 + 4 * i + j, "tokenizer": "chars"}
                    for i, family in enumerate(["qwen2", "qwen3"]) for j, k in enumerate(["base", "a", "b", "c"])})
# --arch --lora: the merges with `model+lora` inputs, a PEFT LoRA (every linear layer: GPT-2's Conv1D, fused
# projections, Mixtral's experts stacked as transformers 5 holds them and its router) of each family's base. Not
# Mamba (PEFT refuses its all-linear) nor the Qwen3-MoE stand-in (its experts are square, 16 × 16: which way PEFT
# saw them the file does not say, so adaptkit refuses them)
LORA_ARCHES = ["gpt2", "phi3", "falcon", "gpt_neox", "phi", "starcoder2", "glm4", "lfm2", "gemma", "stablelm",
               "qwen3", "olmo2", "cohere2", "mixtral"]
ARCH_MODELS.update({f"al_{family}_lora": {"kind": "lora", "base": f"ar_{family}_base", "rank": 4, "seed": 800 + i}
                    for i, family in enumerate(LORA_ARCHES)})
ARCH_FILTERS = ["attn", "mlp", "embed", "norm", "q_proj", "experts", "lm_head", "dense", "conv", "mixer", "gate", "wte"]
VL_MODULES = ("text_decoder", "vision_tower", "multi_modal_projector")
INPUTS = ["fz_base", "fz_a", "fz_b", "fz_c"]
PROMPTS = ["As a doctor of medicine,", "> get ye flask", "Das ist ein Satz auf Deutsch.", "def main():", "2 + 2 =",
           "Once upon a time"]
FILTERS = ["self_attn", "mlp", "embed_tokens", "lm_head", "q_proj", "input_layernorm"]
METHODS = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
           "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nearswap",
           "arcee_fusion", "ram", "ramplus_tl", "passthrough"]
WEIGHTED = {"linear", "nuslerp", "multislerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
            "breadcrumbs_ties", "della", "della_linear"}
TOOLS = ("adaptkit", "mergekit")
FLOAT32_WRITERS = {"arcee_fusion", "ramplus_tl"}  # mergekit writes their float32 results whatever the dtype
DENSE = {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def value(rng, lo, hi, lists=True, filters=FILTERS):
    """A parameter value: a scalar, a gradient, or a list of {filter, value} conditions on `filters` (none:
    no such list)."""
    scalar = lambda: round(rng.uniform(lo, hi), 3)  # noqa: E731
    r = rng.random()
    if r < 0.55 or not lists:
        return scalar()
    if r < 0.8 or not filters:
        return [scalar() for _ in range(rng.randint(2, 4))]
    return [{"filter": f, "value": scalar() if rng.random() < 0.7 else [scalar(), scalar()]}
            for f in rng.sample(filters, rng.randint(1, 2))] + [{"value": scalar()}]


def inputs(rng, method, names):
    """(the models, the base or None) a method takes from `names` (the first is the base)."""
    base, others = names[0], names[1:]
    if method in ("slerp", "nearswap", "arcee_fusion"):
        return [base, rng.choice(others)], base
    if method == "nuslerp":
        with_base = rng.random() < 0.5
        return rng.sample(others, 2) + ([base] if with_base else []), base if with_base else None
    if method in ("karcher", "linear"):
        return rng.sample(names, rng.randint(2, len(names))), None
    if method == "multislerp":
        with_base = rng.random() < 0.5
        return rng.sample(others, rng.randint(2, min(3, len(others)))) + ([base] if with_base else []), \
            base if with_base else None
    least = 1 if method not in ("model_stock", "ram", "ramplus_tl") else 2
    return rng.sample(others, rng.randint(least, min(3, len(others)))) + [base], base


def variant(rng, name: str) -> str:
    """A model as drawn, or its copy stored in half precision, or it with the base's LoRA merged in."""
    r = rng.random()
    if r < 0.1 and name in ("fz_a", "fz_b"):
        return {"fz_a": "fz_a_bf16", "fz_b": "fz_b_fp16"}[name]
    return f"{name}+fz_lora" if r < 0.18 and name != "fz_base" else name


def merge_recipe(rng, names=INPUTS, layers=6, filters=FILTERS) -> dict:
    """One merge of `names` (the first is the base; the fuzzer's Llamas by default, which also come in half
    precision and with a LoRA) of `layers` layers, with `filters` in parameter conditions."""
    method = rng.choice(METHODS)
    if method == "passthrough":  # a frankenmerge: slices of layers from any model, some scaled
        slices = []
        while not slices or (len(slices) < 4 and rng.random() < 0.7):
            start = rng.randint(0, layers - 1)
            source = {"model": rng.choice(names), "layer_range": [start, rng.randint(start + 1, layers)]}
            if rng.random() < 0.3:
                source["parameters"] = {"scale": value(rng, 0.0, 1.5, filters=filters)}
            slices.append({"sources": [source]})
        return {"slices": slices, "merge_method": method, "dtype": rng.choice(["float32", "bfloat16", "float16"])}
    models, base = inputs(rng, method, names)
    if names == INPUTS:
        models = [m if m == base else variant(rng, m) for m in models]
    shared = {}
    if method in ("slerp", "nearswap"):
        shared["t"] = value(rng, 0, 1, filters=filters) if method == "slerp" else value(rng, 0.0001, 0.5, filters=())
    for key, choices, p in (("nuslerp_row_wise", [True, False], 0.5), ("nuslerp_flatten", [True, False], 0.5)):
        if method == "nuslerp" and rng.random() < p:
            shared[key] = rng.choice(choices)
    if method == "karcher":
        shared.update({k: rng.choice(c) for k, c in (("max_iter", [1, 3, 10, 50]), ("tol", [1e-3, 1e-5, 1e-8]))
                       if rng.random() < 0.5})
    if method == "multislerp":
        shared.update({k: rng.choice(c) for k, c in (("normalize_weights", [True, False]), ("eps", [1e-8, 1e-6]))
                       if rng.random() < 0.3})
    if method == "model_stock" and rng.random() < 0.4:
        shared["filter_wise"] = rng.random() < 0.5
    if method in ("ram", "ramplus_tl") and rng.random() < 0.4:
        shared["epsilon"] = rng.choice([1e-5, 1e-3])
    if method == "ramplus_tl":
        shared.update({k: round(rng.uniform(0.05, 0.5), 3) for k in ("r", "alpha") if rng.random() < 0.5})
    if method == "sce" and rng.random() < 0.7:
        shared["select_topk"] = value(rng, 0.1, 1.0, filters=filters)
    if method in DENSE | {"task_arithmetic", "linear"}:
        for key in (("normalize",) if method == "linear" else ("normalize", "rescale", "int8_mask")):
            if rng.random() < 0.25:
                shared[key] = rng.random() < 0.5
        if method != "linear" and rng.random() < 0.25:
            shared["lambda"] = round(rng.uniform(0.5, 1.5), 3)
    entries = []
    for model in models:
        entry, params = {"model": model}, {}
        if model != base:
            if method in WEIGHTED:
                params["weight"] = (value(rng, -0.5, 1.5, filters=filters) if method not in ("nuslerp", "multislerp")
                                    else value(rng, 0.1, 1, filters=filters))
            if method in DENSE and rng.random() < 0.8:
                params["density"] = value(rng, 0.1, 1.0, filters=filters)
            if method.startswith("breadcrumbs") and rng.random() < 0.6:
                params["gamma"] = value(rng, 0.0, 0.1, filters=())
            if method.startswith("della") and rng.random() < 0.6:
                params["epsilon"] = round(rng.uniform(0.0, 0.09), 3)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    weighted = [e["parameters"] for e in entries if "weight" in e.get("parameters", {})]
    if method in WEIGHTED - {"linear", "nuslerp", "multislerp"} and len(weighted) >= 2 and rng.random() < 0.15:
        for i, params in enumerate(weighted):  # weights summing to zero (mergekit divides by 1 there)
            params["weight"] = [0.5, -0.5][i] if i < 2 else 0.0
    doc = {"merge_method": method}
    if rng.random() < 0.25:  # slices: one to three runs of layers, the same range from each model
        cuts = sorted(rng.sample(range(1, layers), rng.randint(0, 2)))
        bounds = [0, *cuts, layers]
        doc["slices"] = []
        for start, stop in zip(bounds, bounds[1:]):
            part = {"sources": [dict(e, layer_range=[start, stop]) for e in entries]}
            if shared and rng.random() < 0.3:  # the slice's own parameters (over the recipe's)
                key = rng.choice(sorted(shared))
                if isinstance(shared[key], float) and not isinstance(shared[key], bool):
                    part["parameters"] = {key: round(shared[key] * rng.uniform(0.5, 1.0), 3)}
            doc["slices"].append(part)
    else:
        doc["models"] = entries
    if base:
        doc["base_model"] = base
    if shared:
        doc["parameters"] = shared
    dtype = rng.choice(["float32", "bfloat16", "float16", "bfloat16", None, "float64" if rng.random() < 0.3 else None])
    # (None: as stored, promoted)
    if dtype:
        doc["dtype"] = dtype
    if rng.random() < 0.15:
        doc["out_dtype"] = rng.choice(["float32", "bfloat16", "float16"])
    return doc


def moe_recipe(rng, names=("mx_base", "mx_a", "mx_b", "mx_c")) -> dict:
    """A mergekit-moe config of `names` (Mistrals by default): experts (with prompts, noise and residual scales),
    shared experts, any gate mode, experts per token, dtype and output architecture."""
    gate = rng.choice(["hidden", "cheap_embed", "random", "uniform_random"])
    names = list(names)
    prompted = gate in ("hidden", "cheap_embed") or rng.random() < 0.5  # (mergekit-moe wants them but for random)

    def expert(name):
        entry = {"source_model": name}
        if prompted:
            entry["positive_prompts"] = rng.sample(PROMPTS, rng.randint(1, 3))
        if rng.random() < 0.3:
            entry["negative_prompts"] = rng.sample(PROMPTS, 1)
        for key in ("noise_scale", "residual_scale"):
            if rng.random() < 0.2:
                entry[key] = round(rng.uniform(0.01, 0.5), 3)
        return entry

    doc = {"base_model": rng.choice(names), "gate_mode": gate,
           "experts": [expert(rng.choice(names)) for _ in range(rng.choice([2, 3, 4]))]}
    if rng.random() < 0.5:
        doc["experts_per_token"] = rng.randint(1, len(doc["experts"]))
    if rng.random() < 0.7:
        doc["dtype"] = rng.choice(["float32", "bfloat16", "float16"])
    if rng.random() < 0.4:
        doc["architecture"] = rng.choice(["mixtral", "qwen"])  # (DeepSeek's output needs its remote code to load)
    if rng.random() < 0.25 or doc.get("architecture") == "qwen":
        doc["shared_experts"] = [expert(rng.choice(names))]
        doc["architecture"] = "qwen"  # (else DeepSeek's, which transformers loads only with its remote code)
    return doc


def modules_recipe(rng) -> dict:
    """A vision-language merge by `modules:`: each module (text decoder, vision tower, projector) with its own
    models or slices (the decoder's 4 layers) and parameters, one method over all."""
    family = rng.choice(["gemma3_vl", "qwen2_5_vl"])
    names = [f"vl_{family}_{k}" for k in ("base", "a", "b")]
    method = rng.choice(["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "breadcrumbs", "karcher",
                         "model_stock", "nuslerp", "multislerp", "sce", "della", "nearswap"])
    models, base = inputs(rng, method, names)
    doc = {"modules": {}, "merge_method": method}
    for module in rng.sample(VL_MODULES, 3):  # (every module: without one, mergekit writes a model lacking it)
        entries = []
        for model in models:
            params = {}
            if model != base and method in WEIGHTED:
                params["weight"] = value(rng, 0.1, 1.0)
            if model != base and method in DENSE:
                params["density"] = value(rng, 0.3, 0.9, filters=())
            entries.append({"model": model, **({"parameters": params} if params else {})})
        part = {}
        if module == "text_decoder" and rng.random() < 0.5:
            start = rng.randint(0, 2)
            part["slices"] = [{"sources": [dict(e, layer_range=[start, 4]) for e in entries]}]
        else:
            part["models"] = entries
        if method in ("slerp", "nearswap"):
            part["parameters"] = {"t": value(rng, 0.0, 1.0) if method == "slerp" else round(rng.uniform(0.01, 0.5), 3)}
        doc["modules"][module] = part
    if base:
        doc["base_model"] = base
    doc["dtype"] = rng.choice(["float32", "bfloat16"])
    return doc


def stages_recipe(rng) -> list[dict]:
    """Two stages (mergekit-multi): a merge of whole models named `first`, then one that takes it as an input."""
    first = merge_recipe(rng)
    while "slices" in first:
        first = merge_recipe(rng)
    final = merge_recipe(rng)
    while "slices" in final:
        final = merge_recipe(rng)
    if final.get("base_model") and rng.random() < 0.3:  # the stage as the base
        final["models"] = [dict(e, model="first") if e["model"] == final["base_model"] else e for e in final["models"]]
        final["base_model"] = "first"
    else:  # the stage as one of the other inputs
        spots = [i for i, e in enumerate(final["models"]) if e["model"] != final.get("base_model")]
        final["models"][rng.choice(spots)]["model"] = "first"
    return [{"name": "first", **first}, final]


def model_entries(doc: dict) -> list[dict]:
    """A merge recipe's model entries: those of `models:` and every slice's sources (each a dict with `model`)."""
    return doc.get("models", []) + [s for part in doc.get("slices", []) for s in part["sources"]]


def chain_recipe(rng) -> list[dict]:
    """Two to four stages (mergekit-multi), each after the first naming the stage before it and, now and then,
    earlier ones: as its base, an input, a slice source, or with the base's LoRA merged in (`s0+fz_lora`). Every
    stage but the last (which has no name) merges whole models, so that its result has their six layers, by a
    method mergekit writes in the recipe's dtype (not FLOAT32_WRITERS: its float32 result would be another input
    to the next stage)."""
    count = rng.randint(2, 4)
    docs = []
    for k in range(count):
        doc = merge_recipe(rng)
        while k < count - 1 and doc["merge_method"] in {"passthrough"} | FLOAT32_WRITERS:
            doc = merge_recipe(rng)
        if k:
            name_stages(rng, doc, [f"s{i}" for i in range(k)])
        docs.append(({"name": f"s{k}"} if k < count - 1 else {}) | doc)
    return docs


def name_stages(rng, doc: dict, stages: list[str]) -> None:
    """Stage names for some of `doc`'s models (each model in every place it is named): the last of `stages`
    always, each earlier one with probability 0.4, a stage that is no base now and then with the LoRA."""
    places: dict[str, list[dict]] = {}
    for entry in model_entries(doc):
        places.setdefault(entry["model"], []).append(entry)
    models = list(places)
    rng.shuffle(models)
    chosen = [stages[-1]] + [s for s in stages[:-1] if rng.random() < 0.4]
    for model, stage in zip(models, chosen):
        if model == doc.get("base_model"):
            doc["base_model"] = stage
        elif "+" in model or rng.random() < 0.1:
            stage += "+fz_lora"
        for entry in places[model]:
            entry["model"] = stage


def reference(rng, model):
    """A model named as a string or as one of mergekit's reference mappings."""
    return rng.choice([model, {"model": model}, {"model": {"path": model}}])


def tokenizer_recipe(rng, names=tuple(TOKENIZED)) -> dict:
    """A merge of `names` (models with the vocabularies of TOKENIZED, in its order) with tokenizer settings."""
    method = rng.choice(["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "karcher", "sce", "model_stock",
                         "breadcrumbs", "nuslerp", "multislerp", "della"])
    names = list(names)
    rng.shuffle(names)
    models, base = inputs(rng, method, names)
    entries = []
    for model in models:
        params = {}
        if model != base and method in WEIGHTED:
            params["weight"] = round(rng.uniform(0.2, 1), 3)
        if model != base and method in DENSE:
            params["density"] = round(rng.uniform(0.3, 0.9), 3)
        entries.append({"model": model, **({"parameters": params} if params else {})})
    doc = {"merge_method": method, "models": entries, "dtype": rng.choice(["float32", "bfloat16"])}
    if base:
        doc["base_model"] = base
    if method == "slerp":
        doc["parameters"] = {"t": round(rng.random(), 3)}
    sources = (["base"] if base else []) + ["union", "model"]
    source = rng.choice(sources)
    source = reference(rng, rng.choice(models)) if source == "model" else source
    if rng.random() < 0.45:
        doc["tokenizer_source"] = source
    else:
        block = {"source": source}
        if rng.random() < 0.6:
            block["tokens"] = {}
            for token in rng.sample(["<|im_start|>", "<|im_end|>", "<UNUSED_0>", "<X>", "_tok_5"], rng.randint(1, 3)):
                kind = rng.random()
                row = ({"kind": "zero"} if kind < 0.15 else reference(rng, rng.choice(models)) if kind < 0.8 else
                       {"kind": "model_token", "model": rng.choice(models), "token": rng.choice(["_tok_7", "<X>", "<|im_end|>"])})
                block["tokens"][token] = {"source": row, **({"force": True} if rng.random() < 0.3 else {})}
        if rng.random() < 0.4:
            block["pad_to_multiple_of"] = rng.choice([8, 32, 64])
        doc["tokenizer"] = block
    if rng.random() < 0.3:
        doc["chat_template"] = rng.choice(["chatml", "alpaca", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"])
    return doc


def tokenizer_chain(rng) -> list[dict]:
    """Two tokenizer recipes (mergekit-multi): the second names the first's result (`s0`, whose vocabulary is
    the one its tokenizer settings made) in place of one of its models, wherever that model is named."""
    first, final = tokenizer_recipe(rng), tokenizer_recipe(rng)
    swapped = rng.choice([entry["model"] for entry in final["models"]])

    def swap(value):
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return "s0" if value == swapped else value
    return [{"name": "s0", **first}, swap(final)]


def refine(row: dict, folder: Path, recipe: suite.Recipe, paths: dict[str, str]) -> None:
    """The suite's status, told apart where the tools differ on purpose (the module docstring); `folder`
    holds both outputs, `paths` the models' folders."""
    status, detail, docs = row["status"], row["detail"], recipe.docs
    base = paths.get(docs[-1].get("base_model")) if isinstance(docs[-1].get("base_model"), str) else None
    blocks = [d.get("tokenizer") or {} for d in docs]
    aliased = any(b.get("source") == "base" and b.get("tokens") for b in blocks)  # (in any stage: its rows go on)
    if aliased and (
            (status == "adaptkit-refused" and "to take its row from" in detail)
            or (status in ("different", "close") and set(unequal(folder)) <= vocabulary(folder))):
        row["status"] = "base-alias"
    elif status == "different" and "modules" in docs[-1] and all("merger.mlp." in n for n in unequal(folder)):
        row["status"] = "projector-order"
    elif status == "adaptkit-refused" and "tokenizer.tokens." in detail and " has no token " in detail:
        row["status"] = "strict-token"
    elif status == "mergekit-failed" and "; adaptkit refused: " in detail:
        row["status"] = "both-refused"
    elif status == "mergekit-failed" and ("; adaptkit ran it (transformers loads the output)" in detail
                                          or detail.endswith("; transformers loads the output; adaptkit ran it")):
        row["status"] = "superset"
    elif status == "different" and ("equal once mergekit's are rounded to adaptkit's dtype" in detail or (
            "tensors in another dtype" in detail and FLOAT32_WRITERS & {d.get("merge_method") for d in docs})):
        row["status"] = "other-dtype"  # (a stage's float32 output is another input to the next)
    elif status == "different" and detail.startswith("config.json dtype"):
        said = {tool: json.loads((folder / tool / "config.json").read_text()).get("dtype") for tool in TOOLS}
        written = {tool: {str(t.dtype).removeprefix("torch.") for t in suite.load_tensors(folder / tool).values()}
                   for tool in TOOLS}
        if written["adaptkit"] == {said["adaptkit"]} and written["mergekit"] != {said["mergekit"]}:
            # mergekit's config.json names a dtype its tensors do not have: compared as if it named theirs
            config = folder / "mergekit" / "config.json"
            config.write_text(json.dumps(dict(json.loads(config.read_text()), dtype=said["adaptkit"])))
            status, detail = suite.compare(recipe, folder / "adaptkit", folder / "mergekit", base)
            row["status"] = "config-dtype" if status in ("equal", "close") else status
            row["detail"] = f"{detail}; mergekit's config.json says {said['mergekit']}"
    elif status == "different" and detail.startswith("tokenizer chat_template") and "### Instruction" in detail:
        row["status"] = "template"
    elif status == "different" and detail.startswith("tokenizer chat_template") and template_base(folder, docs[-1], paths):
        row["status"] = "template-base"
    elif status == "different" and detail.startswith("tokenizer vocab"):
        row["status"], row["detail"] = by_token(folder, random=row["method"] in suite.RANDOM_METHODS)
    elif status == "different" and nonfinite_in_mergekit_only(folder):
        row["status"] = "mergekit-nonfinite"
    elif status == "adaptkit-refused" and "gave NaN or Inf values from finite inputs" in detail:
        theirs = suite.load_tensors(folder / "mergekit")
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in theirs.values()):
            row["status"] = "both-nonfinite"


def vocabulary(folder: Path) -> set[str]:
    """The tensors with a row per token in mergekit's output (embeddings, LM heads and their biases, by any
    architecture's names): their first axis has config.json's vocab_size entries (the stand-ins' hidden
    sizes are other)."""
    rows = json.loads((folder / "mergekit" / "config.json").read_text())["vocab_size"]
    return {n for n, t in suite.load_tensors(folder / "mergekit").items() if t.dim() and t.shape[0] == rows}


def template_base(folder: Path, doc: dict, paths: dict[str, str]) -> bool:
    """Whether, in a merge with neither `base_model` nor `chat_template`, adaptkit's output has the first listed
    input's chat template and mergekit's another input's (mergekit builds the tokenizer on one of the inputs in
    set order, by the process's hash seed; a stage's result is read from mergekit's stage folder)."""
    if doc.get("base_model") or doc.get("chat_template") or not doc.get("models"):
        return False
    refs = [e["model"] if isinstance(e["model"], str) else None for e in doc["models"]]
    if None in refs:
        return False
    inputs = [suite._tokenizer_facts(Path(paths[r]) if r in paths else folder / "mergekit-stages" / r).get("chat_template")
              for r in refs]
    mine, peer = (suite._tokenizer_facts(folder / tool).get("chat_template") for tool in TOOLS)
    return mine == inputs[0] and peer in inputs and mine != peer


def nonfinite_in_mergekit_only(folder: Path) -> bool:
    """Whether some tensors differ, and each holds NaN or Inf in mergekit's output and none in adaptkit's."""
    names = unequal(folder)
    a, m = suite.load_tensors(folder / "adaptkit"), suite.load_tensors(folder / "mergekit")
    return bool(names) and all(n in a and a[n].is_floating_point() and bool(a[n].isfinite().all())
                               and not bool(m[n].isfinite().all()) for n in names)


def unequal(folder: Path) -> list[str]:
    """The tensors whose bytes differ between the two outputs (same names and shapes assumed)."""
    import torch

    a, m = suite.load_tensors(folder / "adaptkit"), suite.load_tensors(folder / "mergekit")
    return [n for n in m if n not in a or a[n].shape != m[n].shape or not torch.equal(a[n], m[n])]


def by_token(folder: Path, random: bool) -> tuple[str, str]:
    """The outputs compared token by token (the module docstring): equal-by-token, or row-order where a
    method that looks at whole tensors (norms, sums, magnitude cuts, random draws: positions matter)
    gives other values with the rows in mergekit's order of that run; different where a tensor's shape
    or anything outside the token rows differs."""
    import torch

    def vocab(out: Path) -> dict[str, int]:
        data = json.loads((out / "tokenizer.json").read_text())
        return dict(data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]})

    ours, theirs = vocab(folder / "adaptkit"), vocab(folder / "mergekit")
    if ours.keys() != theirs.keys():
        return "different", f"token sets differ: {sorted(ours.keys() ^ theirs.keys())[:4]}"
    a, m = suite.load_tensors(folder / "adaptkit"), suite.load_tensors(folder / "mergekit")
    moved, rows = [], vocabulary(folder)
    for name in m:
        if a[name].shape != m[name].shape:
            return "different", f"{name}: shape {tuple(a[name].shape)} in adaptkit, {tuple(m[name].shape)} in mergekit"
        if name in rows:
            order = [(ours[t], theirs[t]) for t in ours]
            mine, peer = a[name][[i for i, _ in order]], m[name][[j for _, j in order]]
        else:
            mine, peer = a[name], m[name]
        if not torch.equal(mine, peer):
            moved.append(f"{name} ({int((mine != peer).sum())} entries)")
    if not moved:
        return "equal-by-token", "the same tokens and rows at other ids"
    return "row-order", (f"{'random method; ' if random else ''}ids in another order and {len(moved)} tensors other: "
                         f"{', '.join(moved[:3])}")


FINE = {"equal", "close", "equal-by-token", "row-order", "both-refused", "superset", "both-nonfinite", "mergekit-nonfinite",
        "other-dtype", "config-dtype", "template", "template-base", "base-alias", "projector-order", "strict-token"}


def stand_ins(prefix: str, family: str) -> list[str]:
    """The four models of a family built for a kind of draw (`ar_`, `mq_`): the base first."""
    return [f"{prefix}_{family}_{k}" for k in ("base", "a", "b", "c")]


def draw(kind: str, seed: int) -> suite.Recipe:
    """Recipe `seed` of a kind: "tok" (a tokenizer recipe), "moe" (a mergekit-moe config), "modules" (a
    vision-language merge), "arch" (a merge of another architecture) or "merge" (one in ten two stages, else
    one merge)."""
    rng = random.Random(seed)
    if kind == "tok":
        docs = [tokenizer_recipe(rng)]
    elif kind == "moe":
        docs = [moe_recipe(rng)]
    elif kind == "modules":
        docs = [modules_recipe(rng)]
    elif kind == "archmoe":
        family = rng.choice(["qwen2", "qwen3"])
        docs = [moe_recipe(rng, stand_ins("mq", family))]
    elif kind == "archtok":
        family = rng.choice(TOKENIZER_ARCHES)
        docs = [tokenizer_recipe(rng, [f"at_{family}_{name[3:]}" for name in TOKENIZED])]
    elif kind == "archlora":
        family = rng.choice(LORA_ARCHES)
        doc = merge_recipe(rng, stand_ins("ar", family), 4, ARCH_FILTERS)
        for entry in model_entries(doc):
            if entry["model"] != doc.get("base_model") and rng.random() < 0.5:
                entry["model"] = f"{entry['model']}+al_{family}_lora"
        docs = [doc]
    elif kind == "chain":
        docs = chain_recipe(rng)
    elif kind == "tokchain":
        docs = tokenizer_chain(rng)
    elif kind == "arch":
        family = rng.choice(ARCHES)
        docs = [merge_recipe(rng, stand_ins("ar", family), 4, ARCH_FILTERS)]
    else:
        docs, kind = (stages_recipe(rng), "multi") if rng.random() < 0.1 else ([merge_recipe(rng)], "merge")
    text = yaml.safe_dump_all(docs, sort_keys=False)
    what = docs[-1].get("merge_method") or docs[-1]["gate_mode"]
    return suite.Recipe(f"{kind}{seed}-{what}", text, {"multi": "multi", "chain": "multi", "tokchain": "multi", "moe": "moe", "archmoe": "moe"}.get(kind, "merge"), "runs", docs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="The first recipe's seed (default 0).")
    parser.add_argument("--count", type=int, default=200, help="Recipes to draw (default 200).")
    parser.add_argument("--tokenizers", action="store_true", help="Draw tokenizer recipes instead.")
    parser.add_argument("--moe", action="store_true", help="Draw mergekit-moe configs instead.")
    parser.add_argument("--modules", action="store_true", help="Draw vision-language merges by modules: instead.")
    parser.add_argument("--stages", action="store_true", help="Draw multi-stage recipes of two to four stages instead "
                        "(with --tokenizers: two tokenizer recipes, the second over the first's result).")
    parser.add_argument("--arch", action="store_true", help="Draw merges of other architecture families instead (with "
                        "--tokenizers: their tokenizer recipes; with --moe: mergekit-moe over Qwen2 and Qwen3 experts).")
    parser.add_argument("--lora", action="store_true", help="With --arch: inputs with a LoRA merged in (model+lora).")
    parser.add_argument("--json", metavar="PATH", help="Write every row (with its recipe) as JSON.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(1)
    import adaptkit.cli  # noqa: F401
    import mergekit.merge  # noqa: F401
    paths = suite.ensure_models(set(MODELS), MODELS, WORK / "models")
    if args.arch:
        paths.update(suite.ensure_models(set(ARCH_MODELS), ARCH_MODELS, WORK / "models"))
    kind = "archlora" if args.lora and args.arch else "archtok" if args.tokenizers and args.arch else "archmoe" if args.moe and args.arch else "tokchain" if args.tokenizers and args.stages else "tok" if args.tokenizers else "moe" if args.moe else "modules" if args.modules else "chain" if args.stages else "arch" if args.arch else "merge"
    rows = []
    for seed in range(args.seed, args.seed + args.count):
        recipe = draw(kind, seed)
        row = suite.run_one(recipe, {}, paths, WORK / "runs", keep=True)
        folder = WORK / "runs" / recipe.id
        refine(row, folder, recipe, paths)
        shutil.rmtree(folder, ignore_errors=True)
        rows.append(dict(row, recipe=recipe.text))
        if row["status"] not in FINE:
            print(f"{row['status']:17} {row['id']}  {row['detail'][:300]}\n    "
                  + recipe.text.rstrip().replace("\n", "\n    "), flush=True)
    counts = collections.Counter(r["status"] for r in rows)
    print(f"{len(rows)} recipes (seeds {args.seed}-{args.seed + args.count - 1}"
          f"{'' if kind == 'merge' else ', ' + kind}): " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
