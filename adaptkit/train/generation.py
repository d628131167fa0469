"""Text from a causal LM and its adapters (transformers' `generate`), so a merge can be checked by eye.

    adaptkit.generate("./llama", "Once upon a time", adapters=["story-lora/"])
    adaptkit.generate("./llama", prompts, adapters=["a/", "b/"], models=["merged/"], compare=True)

Each returns one record per model and prompt: {model, adapters, prompt, text, new_tokens}. A model
reference is a folder, `org/name[@rev]` or an adapter folder (its base read from it, as evaluation
reads it). The runs, in order: the model with its adapters active together, then each other model;
with `compare`, the base alone, the base with each adapter alone (and with all of them, when several),
then each other model. Each prompt runs alone (no padding), greedy by default (temperature 0), else
sampled with the temperature, top-p and top-k given (the model's generation_config.json, else
transformers' defaults, for what is not); every run starts from the same seed, so runs compare, and
the process's random state is restored after. EOS and the rest come from the model's generation config.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import validate
from ..errors import AdaptkitError
from ..io import readers
from ..io.paths import regular_file
from .evaluation import _split_ref, default_device
from .models import build_model, load_adapters, load_tokenizer, resolve_base


def generate(model: str | Path, prompts: str | Sequence[str], adapters: Sequence[str | Path] = (), *,
             models: Sequence[str | Path] = (), compare: bool = False, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             chat: bool = False, device: str | None = None, progress: bool = True,
             allow_pickle: bool = False) -> list[dict[str, Any]]:
    """Generate from `model` with `adapters` (and from each of `models`) for every prompt (the module docstring)."""
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    options = sampling(max_new_tokens, temperature, top_p, top_k)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise AdaptkitError(f"prompts must be one or more strings, got {validate.short(prompts)}")
    runs = plan(model, adapters, models, compare, allow_pickle)
    device = device or default_device()
    records, bar = [], tqdm(total=len(runs) * len(prompts), desc="generate", file=sys.stderr, leave=False,
                            disable=not progress or len(runs) * len(prompts) < 2)
    with bar:
        for group in _by_base(runs):
            folder = resolve_base(group[0][0])
            check_causal(folder, group[0][0])
            tokenizer = load_tokenizer(folder)
            encoded = [encode(tokenizer, prompt, chat).to(device) for prompt in prompts]  # refused before loading
            lm, handle, names = _load(folder, [a for _, ads in group for a in ads], device, progress, allow_pickle)
            for base, ads in group:
                for prompt, ids in zip(prompts, encoded):
                    with _only(handle, [names[a] for a in ads]):
                        record = complete(lm, tokenizer, ids, seed=seed, **options)
                    records.append({"model": base, "adapters": ads, "prompt": prompt, **record})
                    bar.update()
            del lm, handle  # one model in memory at a time
    return records


def plan(model: str | Path, adapters: Sequence[str | Path], models: Sequence[str | Path], compare: bool,
         allow_pickle: bool = False) -> list[tuple[str, list[str]]]:
    """The runs as (base reference, adapters active together), in the order they are printed."""
    base, adapters, _ = _split_ref(model, adapters, allow_pickle)
    where = [str(Path(a).resolve()) if Path(a).exists() else a for a in adapters]  # a/ and ./a are one folder
    twice = next((a for i, a in enumerate(adapters) if where[i] in where[:i]), None)
    if twice is not None:
        raise AdaptkitError(f"adapter {twice} is given twice (it would act twice)")
    runs = [(base, adapters)]
    if compare:
        runs = [(base, [])] + [(base, [a]) for a in adapters] + ([(base, adapters)] if len(adapters) > 1 else [])
    for other in models:
        runs.append(_split_ref(other, (), allow_pickle)[:2])
    return runs


def _by_base(runs: list[tuple[str, list[str]]]) -> list[list[tuple[str, list[str]]]]:
    """Consecutive runs on one base, which share one loaded model."""
    groups: list[list[tuple[str, list[str]]]] = []
    for run in runs:
        if groups and groups[-1][0][0] == run[0]:
            groups[-1].append(run)
        else:
            groups.append([run])
    return groups


def _load(folder: Path, adapters: list[str], device: str, progress: bool, allow_pickle: bool):
    """(model, handle or None, adapter path -> its name on the handle) for one base."""
    model, new = build_model(folder, "causal-lm", progress=progress, allow_pickle=allow_pickle)
    unique = list(dict.fromkeys(adapters))
    handle = load_adapters(model, unique, new, allow_pickle=allow_pickle)
    model.to(device).eval()
    return model, handle, {a: f"adapter{i}" for i, a in enumerate(unique)}


@contextlib.contextmanager
def _only(handle, names: list[str]) -> Iterator[None]:
    """Just these adapters active inside: the base alone when none."""
    if handle is None:
        yield
    elif not names:
        with handle.disabled():
            yield
    else:
        handle.set_active(names)
        yield


def check_causal(folder: Path, ref: str | Path | None = None) -> None:
    """Refuse a model that is not a causal LM (an encoder such as MiniLM): its config.json's architectures."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = folder / "config.json"
    config = validate.model_config(readers.read_json(path), path)
    names = [str(n) for n in config.get("architectures") or ()]
    if not set(names) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        named = ", ".join(names) or "none named"
        raise AdaptkitError(f"{ref or folder}: not a causal language model (architectures: {named}); generate needs one "
                            "such as LlamaForCausalLM")


def sampling(max_new_tokens: int, temperature: float, top_p: float | None, top_k: int | None) -> dict[str, Any]:
    """generate's settings: greedy at temperature 0 (top-p/top-k then refused: they only sample)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AdaptkitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise AdaptkitError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise AdaptkitError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise AdaptkitError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if temperature == 0:
        if top_p is not None or top_k is not None:
            raise AdaptkitError("top-p and top-k only apply when sampling: give a temperature > 0 as well")
        return {"max_new_tokens": max_new_tokens, "do_sample": False}
    given = {"top_p": top_p, "top_k": top_k}
    return {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": float(temperature),
            **{k: v for k, v in given.items() if v is not None}}


def encode(tokenizer, prompt: str, chat: bool = False):
    """The prompt's token ids (1 × L): through the tokenizer's chat template as a user turn with `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise AdaptkitError("--chat: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise AdaptkitError(f"the prompt {validate.short(prompt)} has no tokens to continue")
    return ids


def complete(model, tokenizer, ids, *, seed: int = 0, **options: Any) -> dict[str, Any]:
    """{text, new_tokens}: the model's continuation of `ids`, special tokens left out. The text is the whole
    sequence's decoding less the prompt's, as transformers' text-generation pipeline cuts it: decoding the new
    tokens alone would lose the space a tokenizer folds into a word's first piece."""
    import torch

    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.pad_token_id,
                             **options)
    prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
    text = tokenizer.decode(out[0], skip_special_tokens=True)[len(prompt):]
    return {"text": text, "new_tokens": int(out.shape[1] - ids.shape[1])}


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file (line ends stripped)."""
    path = regular_file(path, "prompt file")
    prompts = [line.rstrip("\r") for line in readers.decode(path.read_bytes(), path).split("\n") if line.strip()]
    if not prompts:
        raise AdaptkitError(f"{path}: no prompts (one per line)")
    return prompts


__all__ = ["check_causal", "complete", "encode", "generate", "plan", "read_prompts", "sampling"]
