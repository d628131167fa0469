"""A live adapter saved through a format plugin chosen by name (`handle.save(out, format=...)`, `train
--format`): the default is PEFT's folder; kohya and diffusers take plain LoRA and refuse, in one line,
what they cannot hold; `hub push` uploads the files the adapter's format reads, whatever the format."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import adaptkit as ak
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.hub.card import split_card
from builders import tiny_llama
from hostile import assert_one_line_error, leftovers, run_cli
from hub_server import FakeHub, online

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
SD_PATHS = [f"{ATTN}.to_q", f"{ATTN}.to_v", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]


def sd_like(seed: int = 0) -> nn.Module:
    """A tiny model whose linear layers sit at Stable Diffusion module paths (what kohya names)."""
    torch.manual_seed(seed)
    root = nn.Module()
    for path in SD_PATHS:
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(leaf, nn.Linear(8, 8))
    return root


def trained(model: nn.Module, variant: str, **config) -> ak.Adapters:
    handle = ak.inject(model, variant, **config)
    with torch.no_grad():
        for _, p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return handle


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.get_submodule(p)(x) for p in SD_PATHS])


@pytest.mark.parametrize("fmt, file_name", [("kohya", "lora.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")])
def test_plain_lora_saves_as_a_single_file_format_and_loads_back(fmt, file_name, tmp_path):
    handle = trained(sd_like(), "lora", r=2, lora_alpha=4, target_modules=["to_q", "to_v", "q_proj"])
    handle.save(tmp_path / "out", format=fmt)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [file_name]
    files = read_adapter(tmp_path / "out")
    assert files.format == fmt and sorted(files.modules) == sorted(SD_PATHS)
    back = ak.load_adapter(sd_like(), tmp_path / "out")
    x = torch.randn(3, 8)
    assert torch.allclose(output(back.model, x), output(handle.model, x), atol=1e-6)


def test_default_format_is_the_peft_folder_byte_for_byte(tmp_path):
    handle = trained(tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    handle.save(tmp_path / "default")
    handle.save(tmp_path / "peft", format="peft")
    names = sorted(p.name for p in (tmp_path / "default").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    assert all((tmp_path / "default" / n).read_bytes() == (tmp_path / "peft" / n).read_bytes() for n in names)


REFUSED = [
    ("vera has shared tensors", "vera", lambda: sd_like(), dict(r=2, target_modules=["to_q", "to_v"]), "kohya",
     "vera adapters cannot be written as kohya (it has no plain low-rank form)"),
    ("ia3 scales activations", "ia3", lambda: sd_like(), dict(target_modules=["to_q"], feedforward_modules=[]),
     "diffusers", "ia3 adapters cannot be written as diffusers (it has no plain low-rank form)"),
    ("lora with a module trained whole", "lora", lambda: sd_like(), dict(r=2, target_modules=["to_q"],
     modules_to_save=["to_v"]), "kohya", "lora adapters cannot be written as kohya (kohya files hold LoRA factors only"),
    ("lora on a model that is no SD", "lora", lambda: tiny_llama(), dict(r=2, target_modules=["q_proj"]), "kohya",
     "lora adapters cannot be written as kohya (module 'model.layers.0.self_attn.q_proj' is not under unet."),
    ("unknown format", "lora", lambda: sd_like(), dict(r=2, target_modules=["to_q"]), "kohyaa", "unknown format plugin 'kohyaa'; did you mean 'kohya'?"),
]


@pytest.mark.parametrize("case, variant, model, config, fmt, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_format_that_cannot_hold_the_variant_refuses_it_in_one_line(case, variant, model, config, fmt, message,
                                                                       tmp_path):
    handle = trained(model(), variant, **config)
    with pytest.raises(AdaptkitError) as err:
        handle.save(tmp_path / "out", format=fmt)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_train_writes_the_format_asked_for(tmp_path):
    from text_models import counting, llama_dir, write_jsonl

    base, data = llama_dir(tmp_path / "llama"), write_jsonl(tmp_path / "data.jsonl", counting()[:8])
    common = ["-q", "train", "--base", base, "--variant", "lora", "--set", "r=2", "--set", 'target_modules=["q_proj"]',
              "--data", data, "--max-steps", "1", "--batch-size", "4"]
    result = run_cli(*common, "--format", "peft", "-o", tmp_path / "peft")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert_one_line_error(run_cli(*common, "--format", "nope", "-o", tmp_path / "nope"), "unknown format plugin 'nope'")
    assert_one_line_error(run_cli(*common, "--format", "kohya", "-o", tmp_path / "kohya"),
                          "lora adapters cannot be written as kohya (module 'model.layers.0.self_attn.q_proj' is not under unet.")


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    server = FakeHub().start()
    online(monkeypatch, server.url, tmp_path)
    yield server
    server.stop()


@pytest.mark.parametrize("fmt, uploaded, library, usage", [
    ("kohya", ["README.md", "lora.safetensors"], None, "AUTOMATIC1111, ComfyUI"),
    ("peft", ["README.md", "adapter_config.json", "adapter_model.safetensors"], "peft", "PeftModel.from_pretrained"),
    ("diffusers", ["README.md", "pytorch_lora_weights.safetensors"], "diffusers", "pipe.load_lora_weights"),
])
def test_hub_push_uploads_the_adapter_whatever_its_format(fmt, uploaded, library, usage, hub_server, tmp_path):
    folder = tmp_path / fmt
    trained(sd_like(), "lora", r=2, target_modules=["to_q", "to_v"]).save(folder, format=fmt)
    (folder / "notes.txt").write_text("not part of the adapter\n")
    result = run_cli("hub", "push", folder, f"me/{fmt}-lora", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(json.loads(result.stdout)["files"]) == uploaded
    files = hub_server.repos[f"me/{fmt}-lora"].commit("main").files
    assert sorted(set(files) - {".gitattributes"}) == uploaded  # the server adds .gitattributes
    assert all(files[n] == (folder / n).read_bytes() for n in uploaded if n != "README.md")
    # The card is the adapter's format's: its tag, the Hub library that loads it (kohya files have none),
    # and how to use it; a kohya file is not called a PEFT folder.
    meta, body = split_card(files["README.md"].decode())
    assert meta["tags"] == [fmt, "lora", "adaptkit"] and meta.get("library_name") == library
    assert usage in body and (fmt == "peft") == ("PEFT" in body)
    pulled = ak.hub.pull(f"me/{fmt}-lora")
    assert sorted(pulled["files"]) == uploaded


def test_saving_does_not_change_the_model(tmp_path):
    handle = trained(sd_like(), "lora", r=2, target_modules=["to_q"])
    before = copy.deepcopy(handle.model.state_dict())
    handle.save(tmp_path / "out", format="kohya")
    assert all(torch.equal(before[k], v) for k, v in handle.model.state_dict().items())
