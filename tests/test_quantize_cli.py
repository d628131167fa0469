"""`adaptkit quantize`: post-training quantization of a whole model with each quantizer plugin."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from adaptkit import registry
from adaptkit.cli import cli
from adaptkit.io.store import open_store
from adaptkit.quant.quantize import packed_names, run_quantize
from adaptkit.io.writer import save_tensors

from builders import tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "llama"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """Rows of whole 64-blocks: on AVX-512 CPUs bitsandbytes 0.50's C kernel unpacks other rows wrongly
    (see plugins/quantizers/_fourbit_unpack.py), so comparisons with its outputs use this model."""
    path = tmp_path_factory.mktemp("q") / "wide"
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


@pytest.mark.parametrize("method", registry.names("quantizer"))
def test_quantize_each_method(llama_dir, tmp_path, method):
    out = tmp_path / "out"
    res = _run("quantize", llama_dir, "--method", method, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    q = registry.get("quantizer", method)
    src, dst = open_store(llama_dir), open_store(out)
    quantized = [k for k in src.keys() if k.endswith(".weight") and len(src.info(k).shape) == 2]
    assert sorted(report["tensors"]) == sorted(quantized)
    assert report["quantized"] == len(quantized) and report["copied"] == len(src) - len(quantized)
    for name in src.keys():
        w = src.get(name)
        if name not in report["tensors"]:
            assert torch.equal(dst.get(name), w)
            continue
        expected = q.quantize(w)
        stored = {k: dst.get(n) for k, n in packed_names(name, expected).items()}
        assert torch.equal(q.dequantize(stored), q.dequantize(expected))
        err = ((q.dequantize(expected).float() - w.float()).norm() / w.float().norm()).item()
        assert report["tensors"][name]["error"] == pytest.approx(err, rel=1e-6)
    errs = [r["error"] for r in report["tensors"].values()]
    assert report["max_error"] == max(errs) and report["mean_error"] == pytest.approx(sum(errs) / len(errs))
    assert report["bytes_after"] < report["bytes_before"]
    assert (out / "config.json").exists()
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["kind"] == "quantized-model" and info["quantization"] == {"method": method}
    assert info["metadata"]["adaptkit_quantization"] == method


def test_skip_list_and_table(llama_dir, tmp_path):
    res = _run("quantize", llama_dir, "--method", "int8", "--skip", "lm_head,embed", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "quantized with int8" in res.output and "relative error" in res.output
    dst, src = open_store(tmp_path / "o"), open_store(llama_dir)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert dst.info(name).dtype == "F32" and f"{name}.scale" not in dst
        assert torch.equal(dst.get(name), src.get(name))
    assert dst.info("model.layers.0.mlp.up_proj.weight").dtype == "I8"


def test_non_float_tensors_copied(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    tensors = {"a.weight": torch.randn(8, 16), "ids.weight": torch.arange(12, dtype=torch.int32).reshape(3, 4),
               "a.bias": torch.randn(8)}
    save_tensors(folder, tensors)
    report = run_quantize(folder, "binary", tmp_path / "o", progress=False)
    assert list(report["tensors"]) == ["a.weight"] and report["copied"] == 2
    dst = open_store(tmp_path / "o")
    assert torch.equal(dst.get("ids.weight"), tensors["ids.weight"]) and torch.equal(dst.get("a.bias"), tensors["a.bias"])


def test_already_quantized_is_refused(llama_dir, tmp_path):
    assert _run("quantize", llama_dir, "--method", "ternary", "-o", tmp_path / "q").exit_code == 0
    res = _run("quantize", tmp_path / "q", "--method", "int8", "-o", tmp_path / "again")
    assert res.exit_code != 0 and "already quantized (ternary)" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "again").exists()


def test_unknown_method_suggests(llama_dir, tmp_path):
    res = _run("quantize", llama_dir, "--method", "nf5", "-o", tmp_path / "o")
    assert res.exit_code != 0 and "did you mean 'nf4'" in res.output and not (tmp_path / "o").exists()


def test_existing_output_needs_force(llama_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    res = _run("quantize", llama_dir, "--method", "int8", "-o", out)
    assert res.exit_code != 0 and "--force" in res.output
    assert _run("quantize", llama_dir, "--method", "int8", "-o", out, "--force").exit_code == 0
    assert open_store(out).info("lm_head.weight").dtype == "I8"


def test_crash_leaves_no_output(llama_dir, tmp_path, monkeypatch):
    q = registry.get("quantizer", "int8")
    calls = {"n": 0}
    real = type(q).quantize

    def flaky(self, tensor):
        calls["n"] += 1
        if calls["n"] > 5:  # fails in the writing pass, with some tensors written
            raise RuntimeError("boom")
        return real(self, tensor)

    monkeypatch.setattr(type(q), "quantize", flaky)
    with pytest.raises(RuntimeError):
        run_quantize(llama_dir, "int8", tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_double_quant_flag_picks_the_double_quantized_form(llama_dir, tmp_path):
    res = _run("quantize", llama_dir, "--method", "nf4", "--double-quant", "-o", tmp_path / "dq", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["method"] == "nf4_dq"
    assert any(k.endswith(".weight.nested_absmax") for k in open_store(tmp_path / "dq").keys())
    res = _run("quantize", llama_dir, "--method", "int8", "--double-quant", "-o", tmp_path / "x")
    assert res.exit_code == 1 and "int8 quantizer has no double-quantized form" in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["nf4", "nf4_dq"])
def test_transformers_with_bitsandbytes_loads_our_4bit_files(wide_llama_dir, tmp_path, method):
    """config.json gets bitsandbytes' quantization_config; transformers' own from_pretrained then
    builds Linear4bit layers from our bytes, and its logits equal our loader's exactly."""
    import warnings

    from transformers import AutoModelForCausalLM

    from adaptkit.train.models import build_model

    out = tmp_path / method
    assert _run("quantize", wide_llama_dir, "--method", method, "--skip", "lm_head,embed", "-o", out).exit_code == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_use_double_quant"] == method.endswith("_dq")
    assert "lm_head" in config["llm_int8_skip_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(theirs.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    theirs.train()  # eval mode on AVX512-BF16 CPUs repacks for another kernel (other sums); no dropout here
    ours, _ = build_model(out, "causal-lm")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
