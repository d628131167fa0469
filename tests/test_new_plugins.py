"""A new format and a new quantizer are one plugin file each, found through an entry point, with no change
to adaptkit's core: every command that takes a format or a quantizer uses them (the variant and the merge
method cases are in test_stored_delta.py and test_shared_logic.py).

`flat` stores a LoRA as one safetensors file: `<module>.down` (A, r × in) and `<module>.up` (B, out × r),
its alpha in the header's metadata. `int16q` packs a weight as q = round(W / m · 32767) in int16 with
m = max |W| per tensor, so Ŵ = q · m / 32767 and |W − Ŵ| ≤ m / 65534.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptkit import registry
from adaptkit.adapter import read_adapter
from hostile import assert_one_line_error, run_cli

FLAT = '''
"""LoRA in one file: <module>.down (A), <module>.up (B); alpha in the metadata."""
from adaptkit.plugin import AdapterFiles, AdaptkitError, save_tensors

ALPHA = "flat.alpha"


class Flat:
    name = "flat"

    def detect(self, store):
        return ALPHA in store.metadata

    def read(self, store):
        modules = {}
        for key in store.infos:
            module, _, part = key.rpartition(".")
            if part not in ("down", "up"):
                raise AdaptkitError(f"flat: {key} is neither a .down nor an .up tensor")
            modules.setdefault(module, {})["lora_A" if part == "down" else "lora_B"] = key
        ranks = {store.info(roles["lora_A"]).shape[0] for roles in modules.values()}
        if len(ranks) != 1:
            raise AdaptkitError(f"flat: one rank for all modules, got {sorted(ranks)}")
        config = {"r": ranks.pop(), "lora_alpha": float(store.metadata[ALPHA]),
                  "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules})}
        return AdapterFiles("lora", config, store, self.name, modules)

    def write(self, adapter, out_dir):
        alphas = {m.alpha for m in adapter.modules.values()}
        ranks = {m.rank for m in adapter.modules.values()}
        if len(alphas) != 1 or len(ranks) != 1 or adapter.config.get("use_rslora"):
            raise AdaptkitError("flat holds one rank and one alpha (alpha / r) for all modules")
        if any(m.transposed or m.embedding for m in adapter.modules.values()):
            raise AdaptkitError("flat holds out x in linear layers only")
        tensors = {}
        for path, m in adapter.modules.items():
            tensors[f"{path}.down"], tensors[f"{path}.up"] = m.a.contiguous(), m.b.contiguous()
        return save_tensors(out_dir, tensors, shard_size=2**62, metadata={ALPHA: repr(alphas.pop())}, stem="flat")


FORMAT = Flat()
'''

INT16Q = '''
"""int16 codes with one absmax per tensor."""
from adaptkit.plugin import AdaptkitError


class Int16Q:
    name = "int16q"

    def quantize(self, tensor):
        import torch

        m = tensor.detach().float().abs().max().reshape(1)
        safe = torch.where(m > 0, m, torch.ones_like(m))
        q = torch.round(tensor.detach().float() / safe * 32767).clamp(-32767, 32767).to(torch.int16)
        return {"weight": q, "weight.absmax": m}

    def dequantize(self, packed):
        if "weight" not in packed or "weight.absmax" not in packed:
            raise AdaptkitError("int16q: needs weight and weight.absmax")
        return packed["weight"].float() * packed["weight.absmax"].float() / 32767

    def detect(self, store):
        keys = set(store.infos)
        return any(k + ".absmax" in keys and store.info(k).dtype == "I16" for k in keys)


QUANTIZER = Int16Q()
'''

Q_PROJ = "model.layers.{}.self_attn.q_proj"


@pytest.fixture
def new_plugins(fake_plugin_dist):
    fake_plugin_dist("fakeplug-new", {"adaptkit.format": {"flat": "fakeplug_flat:FORMAT"},
                                      "adaptkit.quantizer": {"int16q": "fakeplug_int16q:QUANTIZER"}},
                     {"fakeplug_flat": FLAT, "fakeplug_int16q": INT16Q})


def peft_lora(folder, rank=2, alpha=3.0):
    """A PEFT LoRA on the tiny Llama's q_proj layers (32 × 32); returns ΔW = alpha / r · B·A per module."""
    g = torch.Generator().manual_seed(11)
    tensors, deltas = {}, {}
    for i in range(2):
        a, b = torch.randn(rank, 32, generator=g), torch.randn(32, rank, generator=g)
        tensors[f"base_model.model.{Q_PROJ.format(i)}.lora_A.weight"] = a
        tensors[f"base_model.model.{Q_PROJ.format(i)}.lora_B.weight"] = b
        deltas[Q_PROJ.format(i)] = alpha / rank * (b @ a)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
                                                            "target_modules": ["q_proj"]}))
    return deltas


def deltas_of(path):
    adapter = read_adapter(path)
    variant = registry.get("variant", adapter.variant)
    return adapter, {m: variant.delta(adapter, m) for m in adapter.modules}


def test_a_new_format_plugs_into_every_command(new_plugins, llama_dir, tmp_path):
    want = peft_lora(tmp_path / "peft")
    # listed, written by convert, detected by inspect
    listed = json.loads(run_cli("plugins", "--kind", "format", "--json").stdout)
    assert "flat" in {row["name"] for row in listed}
    assert run_cli("-q", "convert", tmp_path / "peft", "--to", "flat", "-o", tmp_path / "flat").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["flat.safetensors"]
    report = json.loads(run_cli("inspect", tmp_path / "flat", "--json").stdout)
    assert (report["kind"], report["format"], report["adapter"]["variant"]) == ("adapter", "flat", "lora")
    adapter, got = deltas_of(tmp_path / "flat")
    assert adapter.format == "flat" and got.keys() == want.keys()
    for module in want:
        torch.testing.assert_close(got[module], want[module])
    # read back into the canonical format, and merged into a base exactly as the PEFT original
    assert run_cli("-q", "convert", tmp_path / "flat", "--to", "peft", "-o", tmp_path / "back").exit_code == 0
    for module, delta in deltas_of(tmp_path / "back")[1].items():
        torch.testing.assert_close(delta, want[module])
    for name in ("peft", "flat"):
        result = run_cli("-q", "merge", "--base", llama_dir, "-m", tmp_path / name, "-o", tmp_path / f"merged-{name}")
        assert result.exit_code == 0, result.stderr
    assert load_file(tmp_path / "merged-flat" / "model.safetensors").keys() == \
        load_file(tmp_path / "merged-peft" / "model.safetensors").keys()
    flat, peft = (load_file(tmp_path / f"merged-{n}" / "model.safetensors") for n in ("flat", "peft"))
    assert all(torch.equal(flat[k], peft[k]) for k in peft)
    # a live adapter is saved in it (the canonical format first, read back in low-rank form)
    handle = __import__("adaptkit").load_adapter(_llama(llama_dir), tmp_path / "peft")
    handle.save(tmp_path / "live", format="flat")
    for module, delta in deltas_of(tmp_path / "live")[1].items():
        torch.testing.assert_close(delta, want[module])


def _llama(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_a_new_format_refuses_what_it_cannot_hold_in_one_line(new_plugins, tmp_path):
    peft_lora(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    result = run_cli("convert", tmp_path / "peft", "--to", "flat", "-o", tmp_path / "flat")
    assert_one_line_error(result, "flat holds one rank and one alpha")
    assert not (tmp_path / "flat").exists()


def test_a_new_quantizer_plugs_into_every_command(new_plugins, llama_dir, tmp_path):
    result = run_cli("-q", "quantize", llama_dir, "--method", "int16q", "--skip", "embed,lm_head",
                     "-o", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.stderr
    packed = load_file(tmp_path / "q" / "model.safetensors")
    original = load_file(llama_dir / "model.safetensors")
    name = f"{Q_PROJ.format(0)}.weight"
    w, q, m = original[name].float(), packed[name], packed[f"{name}.absmax"]
    # the math written out: q = round(W / max|W| · 32767), Ŵ = q · max|W| / 32767
    assert q.dtype == torch.int16 and torch.equal(m, w.abs().max().reshape(1))
    assert torch.equal(q, torch.round(w / m * 32767).to(torch.int16))
    report = json.loads(run_cli("inspect", tmp_path / "q", "--json").stdout)
    assert (report["kind"], report["quantization"]) == ("quantized-model", {"method": "int16q"})
    # merging into the quantized base reads it unpacked: Ŵ + ΔW
    want = peft_lora(tmp_path / "lora")
    result = run_cli("-q", "merge", "--base", tmp_path / "q", "-m", tmp_path / "lora", "-o", tmp_path / "merged",
                     "--dtype", "float32")
    assert result.exit_code == 0, result.stderr
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    torch.testing.assert_close(merged[name], q.float() * m / 32767 + want[Q_PROJ.format(0)])
    assert (merged[name] - w - want[Q_PROJ.format(0)]).abs().max() <= m / 65534 + 1e-5
