"""mergekit-moe's YAML read and checked (`adaptkit moe`; `moe` builds the model it describes).

Every key is used or refused by name: `base_model`, `experts` (each `source_model`,
`positive_prompts`, `negative_prompts`, `noise_scale`, `residual_scale`), `shared_experts` (the same
keys), `gate_mode`, `dtype`, `experts_per_token` and `architecture` (which output: `moe_outputs`).
mergekit's sanity checks apply before any model is read (prompts for prompt-based gates, experts
told apart, prompts for every shared expert or none).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError, short, unknown_name
from ..io import readers
from ..io.dtypes import parse_dtype
from ..io.paths import regular_file
from .moe_gates import GATE_MODES, RANDOM_MODES
from .moe_outputs import OUTPUTS, named
from .refs import Ref

CONFIG_KEYS = frozenset({"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
                         "architecture"})
EXPERT_KEYS = frozenset({"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"})


@dataclass
class Expert:
    ref: Ref
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass
class MoeConfig:
    base: Ref
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    text: str | None = None  # the YAML as given, kept beside the output as mergekit keeps it
    shared: list[Expert] = field(default_factory=list)
    architecture: str | None = None  # mergekit's: a prefix of an output's name (moe_outputs)

    def inputs(self) -> list[str]:
        refs = [self.base, *(e.ref for e in (*self.experts, *self.shared))]
        return [path for ref in refs for path in (ref.model, *ref.adapters)]

    def gated(self) -> list[Expert]:
        """The experts with a router or gate row, in its order: every expert, then the shared ones where
        they have prompts or the gates are random (mergekit draws rows for them then, used or not)."""
        shared = self.shared if any(e.positive for e in self.shared) or self.gate_mode in RANDOM_MODES else []
        return [*self.experts, *shared]


def load_moe_config(source: str | Path | dict, *, allow_same: bool = False) -> MoeConfig:
    """Read and check a mergekit-moe config (YAML file or dict). Every key is used or refused by
    name; mergekit's sanity checks apply (prompts for prompt-based gates, experts told apart)."""
    text = None
    if isinstance(source, dict):
        data, src = source, "moe config"
    else:
        path = regular_file(source, "moe config")
        text = readers.decode(path.read_bytes(), path)  # read once: parsed here, copied into the output
        data, src = readers.load_yaml(text, path), str(path)
    if not isinstance(data, dict):
        raise AdaptkitError(f"{src}: a moe config is a mapping with 'base_model' and 'experts', got {short(data)}")
    _check_keys(src, data, CONFIG_KEYS)
    for key in ("base_model", "experts"):
        if key not in data:
            raise AdaptkitError(f"{src}: '{key}' is missing")
    architecture = _check_architecture(src, data.get("architecture"))
    entries = data["experts"]
    if not isinstance(entries, list) or not entries:
        raise AdaptkitError(f"{src}: experts must be a non-empty list, got {short(entries)}")
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise unknown_name("gate_mode", str(mode), GATE_MODES)
    per_token = data.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise AdaptkitError(f"{src}: experts_per_token must be an integer ≥ 1, got {short(per_token)}")
    dtype = data.get("dtype")
    if dtype is not None:
        dtype_of(dtype, f"{src}: dtype")
    shared = data.get("shared_experts") or []
    if not isinstance(shared, list):
        raise AdaptkitError(f"{src}: shared_experts must be a list, got {short(shared)}")
    config = MoeConfig(Ref.parse(data["base_model"], f"{src}: base_model"),
                       [_expert(f"{src}: experts[{i}]", e) for i, e in enumerate(entries)],
                       mode, dtype, per_token, text,
                       [_expert(f"{src}: shared_experts[{i}]", e) for i, e in enumerate(shared)], architecture)
    _check_sense(config, src, allow_same)
    return config


def _check_keys(where: str, given: dict, allowed: frozenset[str]) -> None:
    for key in given:
        if key not in allowed:
            raise unknown_name(f"key in {where}:", str(key), allowed)


def _check_architecture(src: str, arch: Any) -> str | None:
    """`architecture` names some output (a prefix of its name, as mergekit matches it) or is left out."""
    if arch is None or arch == "":
        return None
    if not isinstance(arch, str):
        raise AdaptkitError(f"{src}: architecture must be a name, got {short(arch)}")
    if not named(arch):
        raise unknown_name("moe architecture", arch, [o.name for o in OUTPUTS])
    return arch


def _expert(where: str, entry: Any) -> Expert:
    if not isinstance(entry, dict):
        raise AdaptkitError(f"{where} must be a mapping with 'source_model', got {short(entry)}")
    _check_keys(where, entry, EXPERT_KEYS)
    if "source_model" not in entry:
        raise AdaptkitError(f"{where}: 'source_model' is missing")
    prompts = {key: _prompts(entry.get(key), f"{where}: {key}") for key in ("positive_prompts", "negative_prompts")}
    scales = {key: _number(entry.get(key), f"{where}: {key}") for key in ("noise_scale", "residual_scale")}
    return Expert(Ref.parse(entry["source_model"], f"{where}: source_model"), prompts["positive_prompts"],
                  prompts["negative_prompts"], scales["noise_scale"], scales["residual_scale"])


def _prompts(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AdaptkitError(f"{what} must be a list of strings, got {short(value)}")
    return value


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdaptkitError(f"{what} must be a finite number, got {short(value)}")
    return float(value)


def dtype_of(name: Any, what: str):
    if not isinstance(name, str):
        raise AdaptkitError(f"{what} must be a dtype name, got {short(name)}")
    try:
        return parse_dtype(name.removeprefix("torch."))
    except AdaptkitError as e:
        raise AdaptkitError(f"{what}: {e}") from None


def _check_sense(config: MoeConfig, src: str, allow_same: bool) -> None:
    """mergekit-moe's `is_bad_config`: enough experts; for gates from prompts, prompts for every
    expert that are not all the same, and experts that are not all one model (else the MoE computes
    what one model does, with more memory: `allow_same` for models that will be trained further).
    mergekit exempts only `random`; `uniform_random` needs no prompts either here."""
    n, k = len(config.experts), config.experts_per_token
    if n < k:
        raise AdaptkitError(f"{src}: {n} expert(s) but experts_per_token is {k}; give at least as many experts")
    if len({bool(e.positive) for e in config.shared}) > 1:
        raise AdaptkitError(f"{src}: give positive_prompts for every shared expert or for none")
    if config.gate_mode in RANDOM_MODES:
        if any(e.positive or e.negative for e in (*config.experts, *config.shared)):
            warnings.warn(f"{src}: gate_mode {config.gate_mode} does not use the experts' prompts", stacklevel=3)
        return
    for i, expert in enumerate(config.experts):
        if not expert.positive:
            raise AdaptkitError(f"{src}: experts[{i}] has no positive_prompts, which gate_mode "
                                f"{config.gate_mode} routes by")
    prompts = {(tuple(e.positive), tuple(e.negative)) for e in config.experts}
    if len(prompts) == 1 and n > 1:
        raise AdaptkitError(f"{src}: every expert has the same prompts, so the router cannot tell them apart")
    if not allow_same and n > 1 and len({str(e.ref) for e in config.experts}) == 1:
        raise AdaptkitError(f"{src}: every expert is {config.experts[0].ref}: the MoE would compute what that "
                            "model does (pass --allow-same-experts to make it anyway, e.g. to train it further)")


__all__ = ["CONFIG_KEYS", "EXPERT_KEYS", "Expert", "MoeConfig", "dtype_of", "load_moe_config"]
