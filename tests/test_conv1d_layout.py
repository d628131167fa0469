"""GPT-2 `Conv1D` (weight stored in × out) beside `nn.Linear` (out × in) in one adapter.

PEFT sets `fan_in_fan_out` per layer while injecting (True at a Conv1D, False at a Linear) and saves
the value it set last, so the saved flag is wrong for some layers of such an adapter. adaptkit takes
each layer's layout from the base model instead. The base is a tiny GPT-2 with an untied `lm_head`
(a Linear, adapted last, so PEFT saves False) and square `attn.c_proj` Conv1D layers (32 × 32: the
shapes cannot tell the layouts apart). Each case is merged into the saved base (mode 2) and compared
with PEFT's `merge_and_unload`, with the saved flag as PEFT left it and forced either way (PEFT itself
ignores it), and with the math written out:

    LoRA, Linear:  W' = W + s·B·A          LoRA, Conv1D (W stored in × out):  W' = W + s·(B·A)ᵀ
    IA3,  Linear:  W' = diag(l)·W          IA3,  Conv1D:                       W' = W·diag(l)
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from adaptkit.errors import AdaptkitError
from adaptkit.files.convert import convert
from adaptkit.merge.engine import run_merge
from builders import state

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

SQUARE, LINEAR = "transformer.h.0.attn.c_proj", "lm_head"
TARGETS = ["attn.c_proj", "c_attn", "lm_head"]


def gpt2_untied(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg).eval()


def peft_config(kind: str, targets: list[str]):
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    if kind == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=["lm_head"], init_ia3_weights=False)
    if kind == "adalora":
        return AdaLoraConfig(target_modules=targets, init_r=4, target_r=2, total_step=10, init_lora_weights=False)
    return LoraConfig(target_modules=targets, r=4, lora_alpha=8, use_dora=kind == "dora", init_lora_weights=False)


def save_peft(kind: str, out, flag: bool | None, targets: list[str] = TARGETS):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to ... Setting fan_in_fan_out to ..."
        model = get_peft_model(gpt2_untied(), peft_config(kind, targets))
        if kind == "adalora":  # E starts at zero: give the update something to carry
            for name, p in model.named_parameters():
                if "lora_E" in name:
                    p.data.normal_()
        model.save_pretrained(out)  # "Setting `save_embedding_layers` to `True`" (lm_head)
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    if flag is not None:  # the flag another module order would have left; PEFT ignores it when loading
        config["fan_in_fan_out"] = flag
        path.write_text(json.dumps(config))
    return out, config["fan_in_fan_out"]


def peft_merged(adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(gpt2_untied(), adapter).merge_and_unload().state_dict()


def merge_into(base, adapter, out) -> dict[str, torch.Tensor]:
    run_merge({"merge_method": "task_arithmetic", "base_model": str(base),
               "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}, out, progress=False)
    return state(out)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "base"
    gpt2_untied().save_pretrained(path)
    return path


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "adalora"])
@pytest.mark.parametrize("flag", [None, True, False], ids=["as_saved", "forced_true", "forced_false"])
def test_merge_into_base_equals_peft_whatever_the_saved_flag(base, tmp_path, kind, flag):
    adapter, saved = save_peft(kind, tmp_path / "adapter", flag)
    assert flag is not None or saved is False  # lm_head, a Linear, was adapted last
    want, got = peft_merged(adapter), merge_into(base, adapter, tmp_path / "out")
    original = gpt2_untied().state_dict()
    changed = [n for n in want if n in got and not torch.equal(want[n], original[n])]
    assert f"{SQUARE}.weight" in changed and f"{LINEAR}.weight" in changed
    for name in changed:
        assert rel(got[name], want[name]) < 1e-5, name


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_square_conv1d_and_linear_alone(base, tmp_path, kind):
    """Only the square Conv1D and the Linear: no shape gives the layout away (the flag-based merge was off by
    a relative 1.4 on attn.c_proj, silently)."""
    adapter, _ = save_peft(kind, tmp_path / "adapter", None, ["attn.c_proj", "lm_head"])
    want, got = peft_merged(adapter), merge_into(base, adapter, tmp_path / "out")
    for name in (f"{SQUARE}.weight", f"{LINEAR}.weight"):
        assert rel(got[name], want[name]) < 1e-5, name


def test_the_math_written_out(base, tmp_path):
    """LoRA and IA3 merged by hand on the Conv1D (in × out) and the Linear (out × in) layer."""
    from safetensors.torch import load_file

    w = gpt2_untied().state_dict()
    lora, _ = save_peft("lora", tmp_path / "lora", None)
    t = load_file(lora / "adapter_model.safetensors")
    got = merge_into(base, lora, tmp_path / "lora-out")
    for module, flip in ((SQUARE, True), (LINEAR, False)):
        a, b = t[f"base_model.model.{module}.lora_A.weight"], t[f"base_model.model.{module}.lora_B.weight"]
        delta = (8 / 4) * (b @ a)
        want = w[f"{module}.weight"] + (delta.T if flip else delta)
        assert rel(got[f"{module}.weight"], want) < 1e-6
    ia3, _ = save_peft("ia3", tmp_path / "ia3", None)
    t = load_file(ia3 / "adapter_model.safetensors")
    got = merge_into(base, ia3, tmp_path / "ia3-out")
    l_conv = t[f"base_model.model.{SQUARE}.ia3_l"].flatten()  # (out, 1): scales outputs
    l_head = t[f"base_model.model.{LINEAR}.ia3_l"].flatten()  # feed-forward (1, in): scales inputs
    assert rel(got[f"{SQUARE}.weight"], w[f"{SQUARE}.weight"] @ torch.diag(l_conv)) < 1e-6
    assert rel(got[f"{LINEAR}.weight"], w[f"{LINEAR}.weight"] @ torch.diag(l_head)) < 1e-6


def test_convert_with_the_base_factors_ia3_in_the_base_layout(base, tmp_path):
    """IA3 to LoRA by SVD (full rank: exact): the LoRA's ΔW, laid out per layer, is PEFT's merge."""
    adapter, _ = save_peft("ia3", tmp_path / "ia3", True)
    convert(adapter, "peft", tmp_path / "lora", rank=64, base=base)
    want, got = peft_merged(adapter), peft_merged(tmp_path / "lora")
    for name in (f"{SQUARE}.weight", f"{LINEAR}.weight", "transformer.h.1.attn.c_attn.weight"):
        assert rel(got[name], want[name]) < 1e-5, name


@pytest.fixture(scope="module")
def bare(base, tmp_path_factory):
    """The base with a config.json that names no model_type (as a custom model's)."""
    import shutil

    path = tmp_path_factory.mktemp("bare") / "base"
    shutil.copytree(base, path)
    config = json.loads((path / "config.json").read_text())
    del config["model_type"]
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("flag", [True, False], ids=["flag_true", "flag_false"])
def test_a_base_without_model_type_goes_by_shapes(bare, tmp_path, kind, flag):
    """No model_type: non-square layers (c_attn 32 → 96, lm_head 32 → 128) take the layout their shape fits."""
    adapter, _ = save_peft(kind, tmp_path / "adapter", flag, ["c_attn", "lm_head"])
    want, got = peft_merged(adapter), merge_into(bare, adapter, tmp_path / "out")
    for name in ("transformer.h.0.attn.c_attn.weight", f"{LINEAR}.weight"):
        assert rel(got[name], want[name]) < 1e-5, name


def test_a_square_layer_of_unknown_type_is_refused_by_name(bare, tmp_path):
    """No model_type and Conv1D layers in the adapter: a square layer could be either, so no guessing."""
    adapter, _ = save_peft("lora", tmp_path / "adapter", False)
    with pytest.raises(AdaptkitError, match=r"GPT-2 Conv1D .*attn.c_proj' is square: .* no model_type"):
        merge_into(bare, adapter, tmp_path / "out")


def test_adapter_merge_settles_disagreeing_flags_with_the_base(base, tmp_path):
    """Two adapters for the same layers, saved with different flags: with the base their sum is PEFT's;
    without it the disagreement is refused by name (the factors would be summed in two layouts)."""
    a, _ = save_peft("lora", tmp_path / "a", True)
    b, _ = save_peft("lora", tmp_path / "b", False)
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b)]
    recipe = {"merge_method": "task_arithmetic", "models": models, "output": {"kind": "adapter", "rank": 16}}
    with pytest.raises(AdaptkitError, match=r"disagree .*\(GPT-2 Conv1D\)"):
        run_merge(dict(recipe), tmp_path / "nobase", progress=False)
    run_merge({**recipe, "base_model": str(base)}, tmp_path / "out", progress=False)
    original, one, two = gpt2_untied().state_dict(), peft_merged(a), peft_merged(b)
    got = peft_merged(tmp_path / "out")
    for name in (f"{SQUARE}.weight", f"{LINEAR}.weight"):
        want = one[name] + two[name] - original[name]
        assert rel(got[name], want) < 1e-5, name


def test_extract_mixes_conv1d_and_linear_and_peft_loads_it(base, tmp_path):
    """A GPT-2 fine-tune with changed Conv1D layers and lm_head (a Linear): the extracted LoRA lays each out as
    its layer (one PEFT config holds both), and PEFT's merge of it at full rank is the fine-tune."""
    from adaptkit.files.convert import extract

    tuned = gpt2_untied()
    with torch.no_grad():
        for name in (SQUARE, "transformer.h.1.attn.c_attn", LINEAR):
            tuned.get_submodule(name).weight.add_(torch.randn_like(tuned.get_submodule(name).weight) * 0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    extract(tmp_path / "tuned", base, tmp_path / "lora", rank=128, progress=False)
    got, want = peft_merged(tmp_path / "lora"), tuned.state_dict()
    for name in (SQUARE, "transformer.h.1.attn.c_attn", LINEAR):
        assert rel(got[f"{name}.weight"], want[f"{name}.weight"]) < 1e-5, name
