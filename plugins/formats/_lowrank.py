"""Helpers the single-file LoRA formats share (no torch at import time).

- `lora_config(ranks, alphas)`: the LoRA config stating every module's rank and alpha exactly:
  r / lora_alpha of the most common module, `rank_pattern` / `alpha_pattern` for the rest, one
  pattern per distinct value, `exact(paths)` = `^(?:p1|p2|…)` of the escaped paths: under PEFT's
  pattern rule `(.*\\.)?(PATTERN)$` it matches those paths and nothing else. (One pattern per value,
  not per path: the rule compiles a regex per pattern and lookup, and hundreds of patterns make
  `inspect` of a file whose alphas all differ take many seconds.)
- `pattern_value(patterns, module, default)`: the same rule read back (PEFT's lookup), and
  `LORA_TYPES`, what each LoRA config field must be. They live here, not in the lora variant, so
  that the formats (diffusers reads a LoraConfig from metadata) and the LoRA-family variants share
  them while plugin imports keep pointing one way, variants -> formats.
- `scalar(store, key)`: a one-element tensor's value read straight from the file (kohya's `alpha`).
- `lowrank_from_lora(adapter_files)`: any plain-LoRA adapter (variant with `module_alpha`) as a
  `LowRankAdapter`, the form format writers take; a converter can use it as it is.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, LowRankAdapter, LowRankModule, dtypes, registry
from adaptkit.plugin import validate as v

PLAIN_ROLES = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})


# What each LoRA field must be, in a file and in `inject`'s settings (adaptkit.validate checks).
LORA_TYPES = {
    "r": v.positive_int, "lora_alpha": v.number, "lora_dropout": v.fraction, "use_rslora": v.optional(v.flag),
    "use_dora": v.optional(v.flag), "fan_in_fan_out": v.optional(v.flag), "lora_bias": v.optional(v.flag),
    "rank_pattern": v.optional(v.patterns(v.positive_int)), "alpha_pattern": v.optional(v.patterns(v.number)),
    "init_lora_weights": v.either(v.flag, v.text, must="true, false or an initialization name"),
    "bias": v.optional(v.text), "loraplus_lr_ratio": v.optional(v.number),
}


class MissingAlphaWarning(UserWarning):
    """LoRA modules stored without their alpha; alpha = rank (scale 1) is assumed."""


def exact(paths, optional: str = "") -> str:
    """A pattern matching exactly `paths` (each optionally preceded by `optional`) under PEFT's rule."""
    escaped = [re.escape(p) for p in sorted(paths)]
    body = escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"
    return "^" + (f"(?:{re.escape(optional)})?" if optional else "") + body


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of the path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def patterns(values: dict[str, Any], default: Any, optional: str = "") -> dict[str, Any]:
    """{exact pattern: value} for the paths whose value differs from `default`, one per value."""
    groups: dict[Any, list[str]] = {}
    for path, value in values.items():
        if value != default:
            groups.setdefault(value, []).append(path)
    return {exact(paths, optional): number(value) for value, paths in sorted(groups.items())}


def number(x: float) -> int | float:
    """8.0 -> 8 (configs read as people write them); 0.5 stays 0.5."""
    return int(x) if float(x).is_integer() else float(x)


def most_common(values) -> Any:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))  # ties: the smallest, so the choice is stable


def lora_config(ranks: dict[str, int], alphas: dict[str, float], optional: str = "") -> dict[str, Any]:
    if not ranks:
        raise AdaptkitError("adapter has no LoRA modules")
    r = most_common(ranks.values())
    alpha = most_common(alphas[m] for m in ranks if ranks[m] == r)
    return {"peft_type": "LORA", "r": r, "lora_alpha": number(alpha),
            "rank_pattern": patterns(ranks, r, optional), "alpha_pattern": patterns(alphas, alpha, optional),
            "target_modules": sorted(ranks), "use_rslora": False, "fan_in_fan_out": False,
            "base_model_name_or_path": None}


def scalar(store, key: str) -> float:
    info = store.info(key)
    if info.numel != 1:
        raise AdaptkitError(f"{info.file}: '{key}' should hold one number but has shape {list(info.shape)}")
    if info.file.suffix == ".safetensors":
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            value = dtypes.scalar(info.dtype, f.read(info.nbytes))
        if value is not None:
            return float(value)
    return float(store.get(key).reshape(-1)[0])


def sample(keys, n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def lowrank_from_lora(adapter: AdapterFiles) -> LowRankAdapter:
    """Tensors and per-module alphas of a plain LoRA adapter, loaded into memory."""
    variant = registry.get("variant", adapter.variant)
    if not hasattr(variant, "module_alpha") or adapter.shared:
        raise AdaptkitError(f"a {adapter.variant} adapter is not a plain LoRA; convert it to lora first")
    modules = {}
    for path, roles in adapter.modules.items():
        extra = sorted(set(roles) - PLAIN_ROLES)
        if extra:
            raise AdaptkitError(f"{path}: {', '.join(extra)} has no plain LoRA form (DoRA?)")
        embedding = "lora_embedding_A" in roles
        a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        transposed = embedding or adapter.transposed.get(path, False)
        modules[path] = LowRankModule(adapter.tensor(path, a_role), adapter.tensor(path, b_role),
                                      float(variant.module_alpha(adapter, path)), embedding, transposed)
    saved = {path: adapter.store.get(key) for path, key in adapter.saved.items()}
    keep = ("base_model_name_or_path", "task_type", "revision", "use_rslora")
    return LowRankAdapter(modules, saved, {k: adapter.config[k] for k in keep if k in adapter.config})


def plain_modules(adapter: LowRankAdapter, fmt: str, *, fold_rslora: bool = True) -> dict[str, LowRankModule]:
    """The modules of `adapter` as a Stable Diffusion LoRA file holds them: out × in weights, no
    embeddings, no whole tensors; with `fold_rslora`, scale alpha / r (rsLoRA's alpha / √r folded
    into alpha as alpha·√r)."""
    if adapter.saved:
        raise AdaptkitError(f"{fmt} files hold LoRA factors only, not whole tensors ({sample(sorted(adapter.saved))})")
    rs = fold_rslora and bool(adapter.config.get("use_rslora"))
    found = {}
    for path, m in adapter.modules.items():
        if m.embedding or m.transposed:
            raise AdaptkitError(f"{path}: {fmt} files have no form for embedding or fan_in_fan_out (Conv1D) LoRA")
        alpha = m.alpha * m.rank ** 0.5 if rs else m.alpha
        found[path] = LowRankModule(m.a, m.b, float(alpha))
    return found
