"""PEFT's warnings when it loads an adaptkit-written adapter that targets both GPT-2 `Conv1D` and `nn.Linear` layers.

PEFT keeps one `fan_in_fan_out` flag and rewrites it per layer while injecting (True at a Conv1D, False at a
Linear, warning "fan_in_fan_out is set to … but the target module is …" at each change), then saves
whichever value it set last: with c_attn and lm_head targets its own file says False, and loading it
back warns twice (False at the first Conv1D, True at lm_head). A mixed file warns at least once on load
whatever it says; the fewest warnings come from the value of the first adapted layer in the model's order,
which in the GPT-2 family (Conv1D blocks before the Linear heads) is True: adaptkit writes True when any
layer is a Conv1D, from a live adapter and from the tensor plane (`convert --base`: the base's model_type
tells the Conv1D layers). Without a base the tensor plane cannot tell them (PEFT's A and B have the same
shapes for both kinds), so a converted PEFT file keeps the flag it came with: PEFT's own count. Each row:
PEFT warns no more on adaptkit's file than on its own (fan_in_fan_out warnings, and all warnings), and
computes the same outputs from it.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import adaptkit as ak
from adaptkit.files.convert import convert
from builders import tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])
FLAG = "fan_in_fan_out"


def peft_config(kind: str, targets: list[str]):
    from peft import IA3Config, LoraConfig

    if kind == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=[], init_ia3_weights=False)
    return LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)


def recorded(fn):
    """fn()'s result and the messages of every warning it raised (each raised, none deduplicated)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def peft_load(base, folder):
    from peft import PeftModel

    return recorded(lambda: PeftModel.from_pretrained(copy.deepcopy(base), folder).eval())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# (id, variant, targets, how adaptkit writes the file: "live" save of its own adapter, or "convert" of PEFT's
# file, with or without the base; the flag it writes)
ROWS = [
    ("lora-live", "lora", ["c_attn", "lm_head"], "live", True),
    ("ia3-live", "ia3", ["c_attn", "lm_head"], "live", True),
    ("lora-three-kinds-live", "lora", ["c_attn", "c_fc", "lm_head"], "live", True),
    ("ia3-three-kinds-live", "ia3", ["c_attn", "c_fc", "lm_head"], "live", True),
    ("lora-convert-base", "lora", ["c_attn", "lm_head"], "convert-base", True),
    ("lora-convert", "lora", ["c_attn", "lm_head"], "convert", False),
]


@pytest.mark.parametrize("kind, targets, how, flag", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_peft_warns_no_more_on_adaptkit_files_than_on_its_own(kind, targets, how, flag, tmp_path):
    from peft import get_peft_model

    base = tiny_gpt2()
    peft, _ = recorded(lambda: get_peft_model(copy.deepcopy(base), peft_config(kind, targets)).eval())
    recorded(lambda: peft.save_pretrained(tmp_path / "peft"))
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[FLAG] is False  # the last layer's
    _, theirs = peft_load(base, tmp_path / "peft")
    if how == "live":
        model = copy.deepcopy(base)
        settings = {"feedforward_modules": [], "init_ia3_weights": False} if kind == "ia3" else \
            {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
        ak.inject(model, kind, target_modules=targets, **settings).save(tmp_path / "ours")
        want = logits(model)
    else:
        base.save_pretrained(tmp_path / "base")  # config.json's model_type: gpt2
        convert(tmp_path / "peft", "peft", tmp_path / "ours", base=tmp_path / "base" if how == "convert-base" else None)
        want = logits(peft)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())[FLAG] is flag  # True: GPT-2's first layer
    loaded, ours = peft_load(base, tmp_path / "ours")
    flagged, their_flagged = [m for m in ours if FLAG in m], [m for m in theirs if FLAG in m]
    if flag:  # one change of layer type (at lm_head): the fewest a mixed file can give
        assert len(flagged) == 1 < len(their_flagged) and "target module is `torch.nn.Linear`" in flagged[0]
    else:
        assert flagged == their_flagged
    assert len(ours) <= len(theirs), ours
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-4)
