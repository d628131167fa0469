"""Random recipes (benchmarks/mergekit_fuzz.py) keep giving mergekit's numbers, or differ only on purpose.

A fixed handful of the fuzzer's seeds, each through mergekit 0.1.5 and adaptkit as the benchmark runs
them: seeds that drew what the issue's recipes lacked (weights summing to zero with `normalize`, float16
merges mergekit turns into NaN, slices and frankenmerges, reference mappings in tokenizer settings) and
a run of consecutive ones. The statuses are the fuzzer's (its docstring); none of them may be
`different`, `adaptkit-crashed` or a refusal of what mergekit runs.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mergekit_fuzz as fuzz  # noqa: E402  (benchmarks/ is not a package)
import mergekit_suite as suite  # noqa: E402

FINE = {"equal", "close", "equal-by-token", "row-order", "both-refused", "both-nonfinite", "other-dtype", "template"}
SEEDS = {  # seed -> the status it must have (None: any of FINE)
    ("merge", 90): "equal",  # ties, weights [0.5, -0.5] with normalize: each entry's own divisor
    ("merge", 223): "equal",  # breadcrumbs_ties, the same
    ("merge", 107): "close",  # dare_linear, the same, undivided
    ("merge", 14): "both-nonfinite",  # multislerp in float16
    ("merge", 5): "equal",  # a passthrough frankenmerge
    ("merge", 20): "equal",  # karcher over slices
    ("tok", 9): "equal",  # model_stock, a token's source as {model: {path}}
    ("tok", 35): "equal",  # breadcrumbs, the same
    **{("merge", s): None for s in range(100, 112)},
    **{("tok", s): None for s in range(40, 46)},
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return suite.ensure_models(set(fuzz.MODELS), fuzz.MODELS, tmp_path_factory.mktemp("fuzz-models"))


@pytest.mark.parametrize("kind, seed", sorted(SEEDS))
def test_drawn_recipe(kind, seed, paths, tmp_path, one_thread):
    doc = (fuzz.tokenizer_recipe if kind == "tok" else fuzz.merge_recipe)(random.Random(seed))
    recipe = suite.Recipe(f"{kind}{seed}", fuzz.yaml.safe_dump(doc, sort_keys=False), "merge", "runs", [doc])
    row = suite.run_one(recipe, {}, paths, tmp_path, keep=True)
    fuzz.refine(row, tmp_path / recipe.id)
    want = SEEDS[kind, seed]
    assert row["status"] in FINE and row["status"] == (want or row["status"]), f"{row['detail']}\n{recipe.text}"
