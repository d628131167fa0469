"""Half-precision recipes give mergekit 0.1.5's bytes (issue 15): `dtype` is the dtype tensors are
loaded and computed in, as in mergekit, and every deterministic method both tools have follows its
operation order. `compute_dtype: float32` instead computes in float32 and rounds once.

Models: a tiny Llama base and two fine-tunes (the base plus noise; in bfloat16 many |τ| are equal, so
TIES and breadcrumbs cut through ties), stored in bfloat16 and in float16.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from adaptkit import registry
from adaptkit.merge.engine import run_merge
from builders import llama_finetunes, state, tiny_llama

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """{dtype name: folder with base/, ft1/, ft2/ stored in that dtype}."""
    root = llama_finetunes(tmp_path_factory.mktemp("half"), count=2, dtypes=DTYPES)
    return {name: root / name for name in DTYPES}


def mergekit_run(recipe: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    mk_run(MergeConfiguration.model_validate(recipe), str(out),
           MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))


# (method, per-model parameters of ft1 and ft2, global parameters, base given, base also an input)
METHODS = {
    "linear": ("linear", [{"weight": 0.3}, {"weight": [0.1, 0.9]}], None, False),
    "slerp": ("slerp", [{}, {}], {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}, True),
    "task_arithmetic": ("task_arithmetic", [{"weight": 0.5}, {"weight": -0.3}], {"lambda": 0.9}, True),
    "ties": ("ties", [{"weight": 0.4, "density": 0.5}, {"weight": 0.3, "density": [0.2, 0.9]}], None, True),
    "ties_unnormalized": ("ties", [{"weight": 0.7, "density": 0.3}, {"weight": 0.6, "density": 0.6}],
                          {"normalize": False, "lambda": 1.2}, True),
    "breadcrumbs": ("breadcrumbs", [{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 2, None, True),
    "breadcrumbs_ties": ("breadcrumbs_ties", [{"weight": 0.6, "density": 0.5, "gamma": 0.1}] * 2, None, True),
    "model_stock": ("model_stock", [{}, {}], None, True),
}


def recipe_for(folder, case: str, dtype: str) -> dict:
    method, params, global_params, with_base = METHODS[case]
    models = [{"model": str(folder / tag), "parameters": p} for tag, p in zip(["ft1", "ft2"], params)]
    recipe = {"merge_method": method, "dtype": dtype, "models": models}
    if method == "slerp":  # mergekit's slerp: the base is one of the two models
        recipe["models"] = [{"model": str(folder / "base")}, {"model": str(folder / "ft2")}]
    if with_base:
        recipe["base_model"] = str(folder / "base")
    if global_params:
        recipe["parameters"] = global_params
    return recipe


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", METHODS)
def test_half_precision_recipe_gives_mergekit_bytes(stored, tmp_path, case, dtype):
    recipe = recipe_for(stored[dtype], case, dtype)
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    mergekit_run(recipe, tmp_path / "mk")
    ours, theirs = state(tmp_path / "ours"), state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == DTYPES[dtype], name
        assert torch.equal(ours[name], expected), name
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["dtype"] == json.loads((tmp_path / "mk" / "config.json").read_text())["dtype"] == dtype


def test_out_dtype_casts_the_result_computed_in_dtype(stored, tmp_path):
    """`dtype: bfloat16, out_dtype: float32`: computed in bfloat16 as mergekit, written in float32."""
    recipe = recipe_for(stored["bfloat16"], "ties", "bfloat16") | {"out_dtype": "float32"}
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    mergekit_run(recipe, tmp_path / "mk")
    ours, theirs = state(tmp_path / "ours"), state(tmp_path / "mk")
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float32 and torch.equal(ours[name], expected), name
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("case", ["linear", "task_arithmetic"])
def test_compute_dtype_float32_rounds_once(stored, tmp_path, case):
    """`compute_dtype: float32`: the formula in float32 on the stored bfloat16 inputs, rounded once to
    the output dtype (bfloat16). mergekit's linear rounds once too (same bytes); its task arithmetic
    rounds every step in bfloat16 (other bytes)."""
    folder = stored["bfloat16"]
    recipe = recipe_for(folder, case, "bfloat16")
    run_merge(recipe | {"compute_dtype": "float32"}, tmp_path / "f32", progress=False, card=False)
    run_merge(recipe, tmp_path / "bf16", progress=False, card=False)
    got, in_bf16 = state(tmp_path / "f32"), state(tmp_path / "bf16")
    base, ft1, ft2 = (state(folder / tag) for tag in ("base", "ft1", "ft2"))
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "bfloat16"
    differ = 0
    for name, tensor in got.items():
        x1, x2, b = ft1[name].double(), ft2[name].double(), base[name].double()
        if case == "linear":  # weights 0.3 and the gradient [0.1, 0.9]: layer i of 2 at t = i, else t = 0
            w2 = 0.1 + 0.8 * (float(name.split(".")[2]) if ".layers." in name else 0.0)
            exact = (0.3 * x1 + w2 * x2) / (0.3 + w2)
        else:
            exact = b + 0.9 * (0.5 * (x1 - b) - 0.3 * (x2 - b))
        assert tensor.dtype == torch.bfloat16
        # one rounding of a float32 result: within half a bf16 ulp (2^-9 relative) plus float32 noise
        torch.testing.assert_close(tensor.double(), exact, rtol=2**-8, atol=1e-6, msg=name)
        op = registry.get("merge", METHODS[case][0])
        inputs = [ft1[name].float(), ft2[name].float()]
        params = {"weight": [0.3, w2]} if case == "linear" else {"weight": [0.5, -0.3], "lambda": 0.9}
        once = op.merge(inputs, None if case == "linear" else b.float(), **params).to(torch.bfloat16)
        assert torch.equal(tensor, once), name
        differ += int((tensor != in_bf16[name]).sum())
    assert (differ > 0) == (case == "task_arithmetic")


@pytest.mark.parametrize(("options", "keys"), [
    (["--dtype", "float16"], {"dtype": "float16"}),
    (["--compute-dtype", "float32", "--out-dtype", "float32"], {"compute_dtype": "float32", "out_dtype": "float32"}),
], ids=["dtype", "compute-and-out"])
def test_cli_options_mean_the_recipe_keys(stored, tmp_path, options, keys):
    """--dtype, --out-dtype and --compute-dtype give the bytes of the recipe keys of the same names."""
    from click.testing import CliRunner

    from adaptkit.cli import cli

    recipe = recipe_for(stored["bfloat16"], "ties", "bfloat16")
    del recipe["dtype"]
    (tmp_path / "r.yml").write_text(json.dumps(recipe))
    result = CliRunner().invoke(cli, ["--quiet", "merge", str(tmp_path / "r.yml"), "-o", str(tmp_path / "cli"),
                                      "--no-card", *options])
    assert result.exit_code == 0, result.output
    run_merge(recipe | keys, tmp_path / "keys", progress=False, card=False)
    ours, expected = state(tmp_path / "cli"), state(tmp_path / "keys")
    dtype = DTYPES.get(keys.get("out_dtype", keys.get("dtype")), torch.float32)
    assert all(ours[n].dtype == dtype and torch.equal(ours[n], t) for n, t in expected.items())


@pytest.mark.parametrize("case", METHODS)
def test_float64_recipe_gives_mergekit_bytes(stored, tmp_path, case):
    """`dtype: float64` (inputs stored in bfloat16 loaded in float64), as mergekit merges it."""
    recipe = recipe_for(stored["bfloat16"], case, "float64")
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    mergekit_run(recipe, tmp_path / "mk")
    ours, theirs = state(tmp_path / "ours"), state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype == torch.float64 and torch.equal(ours[name], expected), name


@pytest.mark.parametrize(("keys", "message"), [
    ({"dtype": "float8_e4m3fn"}, "dtype must be one of float32, bfloat16, float16, float64"),
    ({"compute_dtype": "int8"}, "compute_dtype must be one of"),
    ({"out_dtype": "bf17"}, "out_dtype must be one of"),
], ids=["float8", "int8", "typo"])
def test_dtypes_outside_the_compute_ones_are_refused(stored, tmp_path, keys, message):
    from adaptkit.errors import AdaptkitError

    recipe = recipe_for(stored["bfloat16"], "linear", "bfloat16") | keys
    with pytest.raises(AdaptkitError, match=message):
        run_merge(recipe, tmp_path / "out", progress=False, card=False)


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_five_task_vectors_sum_their_last_entries_as_mergekit(tmp_path, monkeypatch, method, blocks):
    """Five task vectors of +1, −1, 0, 0 and −2⁻²⁶ everywhere, weight 1. Added one after the other
    they sum to −2⁻²⁶, but torch sums the last entries of a stack (numel mod 32 of them) in four
    interleaved partial sums, where −2⁻²⁶ is lost in 1: mergekit's bytes have both sums (task
    arithmetic), or both elected signs (TIES: −1 or +1). Odd sizes, so that every tensor has such
    entries (`stacked_sum`). In row blocks (task arithmetic's, 100 entries asked for) each block
    starts on a multiple of 256 entries, so the last block's last entries are the tensor's."""
    shapes = {"hidden_size": 20, "intermediate_size": 36, "vocab_size": 101, "num_attention_heads": 2}
    model = tiny_llama(**shapes)
    for tag, value in [("base", 0.0), *((f"ft{i}", v) for i, v in enumerate([1.0, -1.0, 0.0, 0.0, -(2.0 ** -26)]))]:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / tag)
    params = {"weight": 1.0} | ({"density": 1.0} if method == "ties" else {})
    recipe = {"merge_method": method, "dtype": "bfloat16", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / f"ft{i}"), "parameters": params} for i in range(5)]}
    if method == "ties":
        recipe["parameters"] = {"normalize": False}
    if blocks:
        from adaptkit.merge import engine

        monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 100)
    run_merge(recipe, tmp_path / "ours", progress=False, card=False, threads=2)
    mergekit_run(recipe, tmp_path / "mk")
    ours, theirs = state(tmp_path / "ours"), state(tmp_path / "mk")
    both = set()
    for name, expected in theirs.items():
        assert torch.equal(ours[name], expected), name
        both |= set(expected.view(-1).tolist())
    assert both == ({0.0, -(2.0 ** -26)} if method == "task_arithmetic" else {1.0, -1.0})
