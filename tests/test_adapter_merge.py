"""Mode 3, adapters -> adapter: `concat` is exact, other operators act on ΔW and re-factor by SVD.

Expected updates are computed here from the PEFT tensors with the paper's formula written out
(ΔW = s·B·A, s = α/r or α/√r for rsLoRA, transposed for embeddings and fan_in_fan_out), and PEFT
itself loads every output.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adaptkit import registry
from adaptkit.files.lowrank import factor_matrix
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import tiny_gpt2, tiny_llama

PREFIX = "base_model.model."


def make_lora(folder, model, seed, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return folder


def pattern(patterns, module, default):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def deltas(folder) -> dict[str, torch.Tensor]:
    """ΔW per module from a PEFT folder, by the formula: s·B·A, s = α/r (α/√r with rsLoRA)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key in tensors:
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_(embedding_)?A(\.weight)?", key)
        if not m:
            continue
        module, embedding = m.group(1), bool(m.group(2))
        a = tensors[key].float()
        b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].float()
        r = a.shape[0]
        assert r == pattern(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        delta = s * (b @ a)
        out[module] = delta.T if embedding or cfg.get("fan_in_fan_out") else delta
    return out


def weighted_sum(folders, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for folder, w in zip(folders, weights):
        for module, delta in deltas(folder).items():
            total[module] = total.get(module, 0) + w * delta
    return total


def assert_close_deltas(got, want, atol=1e-5):
    assert sorted(got) == sorted(want)
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=atol, rtol=1e-4, msg=module)


def recipe(method, folders, weights, rank=None, **extra):
    data = {"merge_method": method, "models": [{"model": str(f), "parameters": {"weight": w}}
                                               for f, w in zip(folders, weights)],
            "output": {"kind": "adapter", **({"rank": rank} if rank else {})}}
    data.update(extra)
    return data


def peft_merged(model, folder) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    return {k: v.detach() for k, v in PeftModel.from_pretrained(model, folder).merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """rsLoRA (first), a plain LoRA of another rank with extra modules (k_proj, an embedding), a
    third with per-module ranks, a DoRA; all on tiny_llama(0). Two GPT-2 fan_in_fan_out LoRAs."""
    root = tmp_path_factory.mktemp("loras")
    make_lora(root / "rs", tiny_llama(), 1, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    make_lora(root / "plain", tiny_llama(), 2, r=2, lora_alpha=3,
              target_modules=["q_proj", "v_proj", "k_proj", "embed_tokens"])
    make_lora(root / "pattern", tiny_llama(), 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
              rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    make_lora(root / "dora", tiny_llama(), 4, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    for i in (1, 2):
        make_lora(root / f"gpt2-{i}", tiny_gpt2(), 10 + i, r=2 + i, lora_alpha=4, fan_in_fan_out=True,
                  target_modules=["c_attn", "c_fc"])
    return root


# -- concat: exact ------------------------------------------------------------------------------
def test_concat_is_exact_with_ranks_rslora_negative_weights_and_partial_modules(loras, tmp_path):
    inputs, weights = [loras / "rs", loras / "plain", loras / "pattern"], [1.0, -0.5, 0.25]
    report = run_merge(recipe("concat", inputs, weights), tmp_path / "out", progress=False)
    want = weighted_sum(inputs, weights)
    assert_close_deltas(deltas(tmp_path / "out"), want)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["peft_type"] == "LORA"
    assert report["ranks"]["model.layers.0.self_attn.q_proj"] == 4 + 2 + 4
    assert report["ranks"]["model.layers.0.self_attn.v_proj"] == 4 + 2 + 2
    assert report["ranks"]["model.layers.0.self_attn.k_proj"] == 2  # only "plain" has it
    assert report["ranks"]["model.embed_tokens"] == 2
    assert report["max_error"] == 0.0 and "sum" in report["note"]


def test_peft_loads_concat_output_and_merges_to_base_plus_sum(loras, tmp_path):
    inputs, weights = [loras / "rs", loras / "plain"], [1.0, -0.5]
    run_merge(recipe("concat", inputs, weights), tmp_path / "out", progress=False)
    base = {k: v.detach() for k, v in tiny_llama().state_dict().items()}
    merged = peft_merged(tiny_llama(), tmp_path / "out")
    want = weighted_sum(inputs, weights)
    for name, value in base.items():
        module = name.removesuffix(".weight")
        expected = value + want[module] if module in want else value
        torch.testing.assert_close(merged[name], expected, atol=1e-5, rtol=1e-5, msg=name)


def test_concat_gpt2_fan_in_fan_out(loras, tmp_path):
    inputs, weights = [loras / "gpt2-1", loras / "gpt2-2"], [0.6, -1.2]
    run_merge(recipe("concat", inputs, weights), tmp_path / "out", progress=False)
    want = weighted_sum(inputs, weights)
    assert_close_deltas(deltas(tmp_path / "out"), want)
    merged, base = peft_merged(tiny_gpt2(), tmp_path / "out"), tiny_gpt2().state_dict()
    for module, delta in want.items():
        torch.testing.assert_close(merged[f"{module}.weight"], base[f"{module}.weight"] + delta, atol=1e-5, rtol=1e-5)


def test_concat_is_registered_and_refuses_a_model_output(llama_dir, tmp_path):
    assert "concat" in registry.names("merge")
    data = {"merge_method": "concat", "models": [{"model": str(llama_dir), "parameters": {"weight": 1.0}}] * 2}
    with pytest.raises(AdaptkitError, match="concat works on LoRA factors"):
        run_merge(data, tmp_path / "out", progress=False)


# -- other operators: ΔW, then SVD -----------------------------------------------------------------
def test_linear_at_full_rank_reproduces_the_weighted_sum(loras, tmp_path):
    inputs, weights = [loras / "rs", loras / "plain"], [0.7, -0.4]
    report = run_merge(recipe("linear", inputs, weights, rank=6, parameters={"normalize": False}),
                       tmp_path / "out", progress=False)
    assert_close_deltas(deltas(tmp_path / "out"), weighted_sum(inputs, weights))
    assert report["max_error"] < 1e-5 and report["rank"] == 6
    assert all(r == 6 for r in report["ranks"].values())


def test_linear_normalize_divides_by_the_weight_sum(loras, tmp_path):
    inputs, weights = [loras / "rs", loras / "plain"], [3.0, 1.0]
    run_merge(recipe("linear", inputs, weights, rank=6), tmp_path / "out", progress=False)
    want = {m: d / 4.0 for m, d in weighted_sum(inputs, weights).items()}
    assert_close_deltas(deltas(tmp_path / "out"), want)


def test_lower_rank_reports_the_relative_error(loras, tmp_path):
    inputs, weights = [loras / "rs", loras / "pattern"], [0.5, 0.5]
    report = run_merge(recipe("linear", inputs, weights, rank=2), tmp_path / "out", progress=False)
    want = weighted_sum(inputs, weights)
    got = deltas(tmp_path / "out")
    for module, target in want.items():
        error = float(torch.linalg.norm(target - got[module]) / torch.linalg.norm(target))
        optimal = float(torch.linalg.svdvals(target)[2:].norm() / torch.linalg.norm(target))
        assert report["errors"][module] == pytest.approx(error, rel=1e-4, abs=1e-6)
        assert optimal - 1e-6 <= error <= optimal * 1.01 + 1e-6  # Eckart–Young: truncated SVD is optimal
        assert report["ranks"][module] == 2
    assert report["max_error"] == max(report["errors"].values()) > 0.05


def test_rank_beyond_the_dimensions_is_clamped_with_a_warning(loras, tmp_path):
    inputs = [loras / "gpt2-1", loras / "gpt2-2"]
    with pytest.warns(UserWarning, match="exceeds min"):
        report = run_merge(recipe("linear", inputs, [1.0, 1.0], rank=64, parameters={"normalize": False}),
                           tmp_path / "out", progress=False)
    assert report["ranks"]["transformer.h.0.attn.c_attn"] == 32
    assert report["max_error"] < 1e-5
    assert_close_deltas(deltas(tmp_path / "out"), weighted_sum(inputs, [1.0, 1.0]))


def test_ties_acts_on_the_updates(loras, tmp_path):
    inputs, weights = [loras / "rs", loras / "plain", loras / "pattern"], [1.0, 0.5, 0.8]
    ties = registry.get("merge", "ties")
    full = run_merge(recipe("ties", inputs, weights, rank=64, parameters={"density": 0.5}), tmp_path / "full",
                     progress=False)
    per_input = [deltas(f) for f in inputs]
    got = deltas(tmp_path / "full")
    for module in got:
        ds = [d.get(module) for d in per_input]
        ds = [d if d is not None else torch.zeros_like(next(x for x in ds if x is not None)) for d in ds]
        want = ties.merge(ds, torch.zeros_like(ds[0]), weight=weights, density=0.5)
        torch.testing.assert_close(got[module], want, atol=1e-5, rtol=1e-4)
    assert full["max_error"] < 1e-5
    low = run_merge(recipe("ties", inputs, weights, rank=2, parameters={"density": 0.5}), tmp_path / "low",
                    progress=False)
    assert set(low["errors"]) == set(got) and 0 < low["max_error"] <= 1


def test_dare_is_seeded_and_reproducible(loras, tmp_path):
    data = recipe("dare_ties", [loras / "rs", loras / "plain"], [1.0, 1.0], rank=4, parameters={"density": 0.5})
    a = run_merge(data, tmp_path / "a", progress=False, seed=7)
    b = run_merge(data, tmp_path / "b", progress=False, seed=7)
    c = run_merge(data, tmp_path / "c", progress=False, seed=8)
    file = "adapter_model.safetensors"
    assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / file).read_bytes() != (tmp_path / "c" / file).read_bytes()
    assert a["errors"] == b["errors"] and c["seed"] == 8


def test_gpt2_fan_in_fan_out_svd_path_loads_in_peft(loras, tmp_path):
    inputs, weights = [loras / "gpt2-1", loras / "gpt2-2"], [1.5, -0.5]
    report = run_merge(recipe("task_arithmetic", inputs, weights, rank=7), tmp_path / "out", progress=False)
    want = weighted_sum(inputs, weights)
    assert_close_deltas(deltas(tmp_path / "out"), want)
    assert report["max_error"] < 1e-5
    merged, base = peft_merged(tiny_gpt2(), tmp_path / "out"), tiny_gpt2().state_dict()
    for module, delta in want.items():
        torch.testing.assert_close(merged[f"{module}.weight"], base[f"{module}.weight"] + delta, atol=1e-5, rtol=1e-5)


def test_dora_needs_the_base_and_then_matches_peft(loras, llama_dir, tmp_path):
    with pytest.raises(AdaptkitError, match="base"):
        run_merge(recipe("linear", [loras / "dora"], [1.0], rank=32), tmp_path / "nobase", progress=False)
    assert not (tmp_path / "nobase").exists()
    with pytest.raises(AdaptkitError, match="concatenation cannot be exact"):
        run_merge(recipe("concat", [loras / "dora", loras / "rs"], [1.0, 1.0]), tmp_path / "cat", progress=False)
    with pytest.warns(UserWarning, match="exceeds min"):
        report = run_merge(recipe("linear", [loras / "dora"], [1.0], rank=32, base_model=str(llama_dir)),
                           tmp_path / "out", progress=False)
    assert report["max_error"] < 1e-5
    base = tiny_llama().state_dict()
    want = {n.removesuffix(".weight"): w - base[n] for n, w in peft_merged(tiny_llama(), loras / "dora").items()
            if not torch.equal(w, base[n])}
    assert_close_deltas(deltas(tmp_path / "out"), want)


def refactor(m, rank, seed=0):
    """(B, A, error) as the adapter merge re-factors: the rank kept, randomized where far below."""
    f = factor_matrix(m, rank, keep_rank=True, seed=seed)
    return f.b, f.a, f.error


def refactor_matches_full_svd_on_a_random_matrix():
    m = torch.randn(40, 3, generator=torch.Generator().manual_seed(0)) @ torch.randn(3, 50)
    b, a, error = refactor(m, 3)
    torch.testing.assert_close(b @ a, m, atol=1e-4, rtol=1e-4)
    assert error < 1e-5


def test_refactor_randomized_and_full_paths():
    refactor_matches_full_svd_on_a_random_matrix()
    m = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    b1, a1, e1 = refactor(m, 4, seed=3)  # randomized: 4·4 < 48
    b2, a2, e2 = refactor(m, 4, seed=3)
    assert torch.equal(b1, b2) and e1 == e2
    optimal = float(torch.linalg.svdvals(m)[4:].norm() / m.norm())
    assert optimal <= e1 <= optimal * 1.02
    assert refactor(torch.zeros(8, 8), 2)[2] == 0.0


# -- bad input -----------------------------------------------------------------------------------
def test_a_full_model_input_is_an_error(loras, llama_dir, tmp_path):
    with pytest.raises(AdaptkitError, match="is not an adapter"):
        run_merge(recipe("concat", [loras / "rs", llama_dir], [1.0, 1.0]), tmp_path / "out", progress=False)
    with pytest.raises(AdaptkitError, match="needs output.rank"):
        run_merge(recipe("linear", [loras / "rs"], [1.0]), tmp_path / "out", progress=False)


FAKE_VARIANT = """
from adaptkit_plugins.variants.lora import LORA_CONFIG_KEYS

class Fake:
    name = "fakevariant"
    param_names = ("lora_A", "lora_B")
    config_keys = LORA_CONFIG_KEYS
    def describe(self, adapter):
        return {}
    def delta(self, adapter, module, base=None):
        return adapter.tensor(module, "lora_B").float() @ adapter.tensor(module, "lora_A").float()

VARIANT = Fake()
"""


def test_mixed_variants_and_a_variant_without_hooks(loras, tmp_path, fake_plugin_dist):
    import shutil

    fake_plugin_dist("fakeplug-dist", {"adaptkit.variant": {"fakevariant": "fakeplug_var:VARIANT"}},
                     {"fakeplug_var": FAKE_VARIANT})
    other = tmp_path / "fake"
    shutil.copytree(loras / "rs", other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(dict(cfg, adaptkit_variant="fakevariant")))
    with pytest.raises(AdaptkitError, match="mix variants"):
        run_merge(recipe("concat", [loras / "rs", other], [1.0, 1.0]), tmp_path / "out", progress=False)
    with pytest.raises(AdaptkitError, match="lacks the factors, factor_layout, write_lowrank hook"):
        run_merge(recipe("concat", [other, other], [1.0, 1.0]), tmp_path / "out", progress=False)
    with pytest.raises(AdaptkitError, match="lacks the factor_layout, write_lowrank hook"):
        run_merge(recipe("linear", [other], [1.0], rank=2), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_saved_full_tensors_are_left_out_with_a_warning(peft_lora_dir, loras, tmp_path):
    with pytest.warns(UserWarning, match="left out"):
        report = run_merge(recipe("concat", [peft_lora_dir, loras / "rs"], [1.0, 1.0]), tmp_path / "out",
                           progress=False)
    assert report["dropped"] == ["lm_head.weight"]
    assert_close_deltas(deltas(tmp_path / "out"), weighted_sum([peft_lora_dir, loras / "rs"], [1.0, 1.0]))


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_concat_quick_form(loras, tmp_path):
    a, b, out = loras / "rs", loras / "plain", tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "merge", "--method", "concat", "-m", f"{a}:1", "-m", f"{b}:-0.5",
                                      "--rank", "8", "-o", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "concat" and "sum of the inputs' ranks" in report["note"]
    assert report["ranks"]["model.layers.0.self_attn.q_proj"] == 6
    assert_close_deltas(deltas(out), weighted_sum([a, b], [1.0, -0.5]))
    # concat needs no --rank: an operator on adapters' factors makes an adapter (ranks add up)
    plain = CliRunner().invoke(cli, ["-q", "merge", "--method", "concat", "-m", f"{a}:1", "-m", f"{b}:-0.5",
                                     "-o", str(tmp_path / "no-rank")], catch_exceptions=False)
    assert plain.exit_code == 0, plain.output
    assert_close_deltas(deltas(tmp_path / "no-rank"), weighted_sum([a, b], [1.0, -0.5]))
    text = CliRunner().invoke(cli, ["-q", "merge", "--method", "linear", "-m", f"{a}:0.5", "-m", f"{b}:0.5",
                                    "--rank", "4", "-o", str(tmp_path / "lin")], catch_exceptions=False)
    assert text.exit_code == 0 and "with linear into" in text.stdout


def test_cli_concat_on_a_model_is_one_line(loras, llama_dir, tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--method", "concat", "-m", f"{loras / 'rs'}:1", "-m",
                                      f"{llama_dir}:1", "--rank", "8", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "is not an adapter" in result.stderr
