"""Random recipes (benchmarks/mergekit_fuzz.py) keep giving mergekit's numbers, or differ only on purpose.

A fixed handful of the fuzzer's seeds, each through mergekit 0.1.5 and adaptkit as the benchmark runs
them: seeds that drew what the issue's recipes lacked (weights summing to zero with `normalize`, float16
merges mergekit turns into NaN, frankenmerges, `model+lora` and half-precision inputs, two stages,
chains of up to four stages, reference mappings in tokenizer settings, mergekit-moe configs, vision-language merges by `modules:`,
other architectures: scalar tensors, MoE layers of two kinds, an encoder) and a run of consecutive ones. The statuses are the fuzzer's (its docstring); none of them may be
`different`, `adaptkit-crashed` or a refusal of what mergekit runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mergekit_fuzz as fuzz  # noqa: E402  (benchmarks/ is not a package)
import mergekit_suite as suite  # noqa: E402

SEEDS = {  # seed -> the status it must have (None: any of the fuzzer's FINE ones)
    ("merge", 6422): "equal",  # ties, weights [0.5, -0.5] with normalize: each entry's own divisor
    ("merge", 4557): "equal",  # breadcrumbs_ties, the same
    ("merge", 16477): "equal",  # task_arithmetic, the same: the sum left undivided
    ("merge", 4253): "close",  # dare_linear, the same
    ("merge", 3050): "both-nonfinite",  # breadcrumbs, the same in float16: 1e-8 is 0 there, mergekit divides by 0
    ("merge", 94): "both-nonfinite",  # multislerp in float16: ε is 0 there, identical norms give 0/0
    ("merge", 3095): "equal",  # a passthrough frankenmerge with scales
    ("merge", 26): "equal",  # ties over a `model+lora` input
    ("merge", 3105): "equal",  # task_arithmetic without dtype, over inputs stored in half and single precision
    ("merge", 3152): "equal",  # task_arithmetic in float64
    ("merge", 513): "equal",  # two stages: karcher over a karcher, the stage's bfloat16 in float16
    ("merge", 547): "equal",  # two stages, the second in float64
    ("merge", 9669): "mergekit-nonfinite",  # RAM+ with a slice's ε rounded to 0: mergekit's ρᵢ = 0/0, adaptkit's λᵢ = 1
    ("merge", 9141): "close",  # DARE over a DARE stage: the stages' masks were one draw thinned (norm 8 % off)
    ("chain", 9): "equal",  # multislerp over a bf16 stage with a LoRA merged in, in float32: the sum rounded to bf16
    ("chain", 285): "equal",  # four stages; a bf16 stage + LoRA in a float32 multislerp
    ("tokchain", 41): None,  # a union over a stage's union, padded to 64: equal, or equal by token in mergekit's hash order
    ("tokchain", 55): "equal",  # a token's row taken from a stage's result
    ("tokchain", 53): None,  # no base: template-base or equal, as mergekit's hash order puts one input or the other first
    ("chain", 12): "close",  # a frankenmerge of a DELLA stage over a DARE stage (mergekit-multi seeded once)
    ("tok", 9): "equal",  # model_stock, a token's source as {model: {path}}
    ("tok", 35): "equal",  # breadcrumbs, the same
    ("tok", 270): "base-alias",  # source: base with tokens: mergekit takes the base's padding row
    ("tok", 559): "strict-token",  # a tokens: entry naming a token its model lacks (mergekit never reads it)
    ("moe", 41): "equal",  # mergekit-moe: uniform_random gates, a shared expert (Qwen MoE)
    ("moe", 14): "equal",  # hidden gates from prompts, a shared expert
    ("moe", 45): "equal",  # random gates
    ("modules", 2): "equal",  # a vision-language slerp by modules:, the decoder sliced
    ("modules", 8): "equal",  # breadcrumbs by modules:, on Gemma-3
    ("modules", 7): "projector-order",  # Qwen2.5-VL's projector under a weight gradient (mergekit's task order)
    ("arch", 196): "other-dtype",  # arcee_fusion on Apertus, whose scalar tensors crashed it
    ("arch", 312): "other-dtype",  # karcher on Apertus: mergekit writes its scalars in float32
    ("arch", 163): "superset",  # a GLM-4-MoE slice starting at an expert layer (mergekit fails; adaptkit's loads)
    ("arch", 116): "superset",  # a GTE frankenmerge: mergekit's config keeps 4 layers, the 4th initialized at random
    ("arch", 188): "close",  # DARE on Mamba: a few dt_proj biases carry the norm (the wider tolerance)
    ("archmoe", 3): "equal",  # mergekit-moe over Qwen2 experts: Qwen MoE with a gated shared expert
    ("archmoe", 23): "equal",  # over Qwen3 experts: Qwen3 MoE, hidden-state gates
    ("archlora", 2): "equal",  # slerp over a Mixtral with a LoRA on its stacked experts and router merged in
    ("archlora", 31): "equal",  # nearswap over GPT-2 inputs with a LoRA merged in (Conv1D: fan_in_fan_out)
    ("archlora", 14): "equal",  # a Phi-3 frankenmerge of inputs with a LoRA on its fused qkv_proj and gate_up_proj
    ("archtok", 91): "base-alias",  # GPT-2's tied wte: a vocabulary tensor by its rows, whatever its name
    **{("merge", s): None for s in range(100, 112)},
    **{("tok", s): None for s in range(40, 46)},
}
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    drawn = "".join(fuzz.draw(kind, seed).text for kind, seed in SEEDS if kind.startswith("arch"))
    named = {n for n in fuzz.ARCH_MODELS if n in drawn}  # (only the models those seeds name, and their LoRAs' bases)
    named |= {fuzz.ARCH_MODELS[n]["base"] for n in named if fuzz.ARCH_MODELS[n].get("kind") == "lora"}
    arch = {n: fuzz.ARCH_MODELS[n] for n in named}
    return suite.ensure_models(set(fuzz.MODELS) | set(arch), {**fuzz.MODELS, **arch}, tmp_path_factory.mktemp("fuzz-models"))


@pytest.mark.parametrize("kind, seed", sorted(SEEDS))
def test_drawn_recipe(kind, seed, paths, tmp_path, one_thread):
    recipe = fuzz.draw(kind, seed)
    row = suite.run_one(recipe, {}, paths, tmp_path, keep=True)
    fuzz.refine(row, tmp_path / recipe.id, recipe, paths)
    want = SEEDS[kind, seed]
    assert row["status"] in fuzz.FINE and row["status"] == (want or row["status"]), f"{row['detail']}\n{recipe.text}"
