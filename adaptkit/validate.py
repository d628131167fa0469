"""Checking what files we did not write say, before anything uses it (reading them, bounded, is
`adaptkit.io.readers`).

`check_fields(config, FIELDS, where)` checks each field present against its checker, such as
`positive_int`, `number`, `flag`, `text`, `texts`, `mapping`, `patterns(check)`, `optional(check)`;
a checker returns the value or raises one line "where: field must be ..., got <short value>".
Messages show values through `short`, never a whole structure. `ADAPTER_FIELDS` and
`MODEL_FIELDS` are the tables for adapter configs and transformers' config.json; a variant adds
its own fields as `config_types`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import spec
from .errors import AdaptkitError, short  # short: values in this module's messages (and its users')

Check = Callable[[Any, str], Any]


# -- field checkers --------------------------------------------------------------------------------
def _fail(what: str, must: str, value: Any) -> AdaptkitError:
    return AdaptkitError(f"{what} must be {must}, got {short(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, what: str) -> int:
    if not _is_int(value) or value < 1:
        raise _fail(what, "a positive integer", value)
    return value


def count(value: Any, what: str) -> int:
    """An integer ≥ 0."""
    if not _is_int(value) or value < 0:
        raise _fail(what, "an integer ≥ 0", value)
    return value


def integer(value: Any, what: str) -> int:
    if not _is_int(value):
        raise _fail(what, "an integer", value)
    return value


def _real(value: Any) -> bool:
    """An int or float a float can hold finitely (bool is none: `true` for a number is a typo)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def number(value: Any, what: str) -> float:
    """A finite real number."""
    if not _real(value):
        raise _fail(what, "a finite number", value)
    return value


def fraction(value: Any, what: str) -> float:
    """A probability such as a dropout rate: a number in [0, 1)."""
    if not _real(value) or not 0 <= value < 1:
        raise _fail(what, "a number in [0, 1)", value)
    return value


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(what, "true or false", value)
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(what, "a string", value)
    return value


def texts(value: Any, what: str) -> str | list[str]:
    """A string or a list of strings (a tuple or set from Python too)."""
    if isinstance(value, str) or (isinstance(value, (list, tuple, set, frozenset))
                                  and all(isinstance(v, str) for v in value)):
        return value
    raise _fail(what, "a string or a list of strings", value)


def targets(value: Any, what: str) -> str | list[str]:
    """Module selection as PEFT's configs give it: a regex the whole path must match, or a list of names."""
    texts(value, what)
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise AdaptkitError(f"{what} {short(value)} is not a valid regex ({e.msg})") from None
    return value


def choice(*names: str) -> Check:
    """One of the strings `names`."""
    def checked(value: Any, what: str) -> str:
        if not isinstance(value, str) or value not in names:
            raise _fail(what, f"one of {', '.join(names)}", value)
        return value

    return checked


def mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(what, "a mapping", value)
    return value


def optional(check: Check) -> Check:
    """`check`, or null."""
    def checked(value: Any, what: str) -> Any:
        return None if value is None else check(value, what)

    return checked


def either(*checks: Check, must: str) -> Check:
    """The first of `checks` that accepts the value; `must` says what they accept together."""
    def checked(value: Any, what: str) -> Any:
        for check in checks:
            try:
                return check(value, what)
            except AdaptkitError:
                continue
        raise _fail(what, must, value)

    return checked


def list_of(check: Check) -> Check:
    """A list (or tuple) whose every item `check` accepts."""
    def checked(value: Any, what: str) -> list:
        if not isinstance(value, (list, tuple)):
            raise _fail(what, "a list", value)
        return [check(item, f"{what}[{i}]") for i, item in enumerate(value)]

    return checked


def record(fields: Mapping[str, Check]) -> Check:
    """A mapping whose fields listed in `fields` pass their checks (others are not looked at)."""
    def checked(value: Any, what: str) -> dict:
        mapping(value, what)
        for name, check in fields.items():
            if name in value:
                check(value[name], f"{what}.{name}")
        return value

    return checked


def map_of(check: Check, key: Check | None = None) -> Check:
    """A mapping from strings (that `key` also accepts, when given) to values `check` accepts."""
    def checked(value: Any, what: str) -> dict:
        mapping(value, what)
        for name, item in value.items():
            text(name, f"{what} key")
            if key is not None:
                key(name, f"{what} key")
            check(item, f"{what}[{short(name)}]")
        return value

    return checked


def _pattern_key(key: str, what: str) -> str:
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error as e:
        raise AdaptkitError(f"{what} {short(key)} is not a valid regex ({e.msg})") from None
    return key


def patterns(check: Check) -> Check:
    """`rank_pattern` / `alpha_pattern` as PEFT's configs give them: regexes (matched as `(.*\\.)?(KEY)$`) to values."""
    return map_of(check, key=_pattern_key)


def check_fields(config: Mapping[str, Any], fields: Mapping[str, Check], where: str | Path) -> None:
    """Every field of `config` that `fields` has a checker for passes it (absent fields are not checked)."""
    for name, check in fields.items():
        if name in config:
            check(config[name], f"{where}: {name}")


# -- what the core reads from files it did not write ---------------------------------------------
#: Fields of a PEFT adapter config that every variant shares (a variant's own: its `config_types`).
ADAPTER_FIELDS: dict[str, Check] = {
    "peft_type": optional(text), "adaptkit_variant": optional(text), "task_type": optional(text),
    "base_model_name_or_path": optional(text), "revision": optional(text), "inference_mode": optional(flag),
    "target_modules": optional(targets), "exclude_modules": optional(targets), "modules_to_save": optional(targets),
    "layers_to_transform": optional(either(count, list_of(count), must="an integer ≥ 0 or a list of them")),
    "layers_pattern": optional(texts), "peft_version": optional(text), "adaptkit_version": optional(text),
}

#: Fields of a transformers config.json that adaptkit reads.
MODEL_FIELDS: dict[str, Check] = {
    "model_type": optional(text), "architectures": optional(list_of(text)), "hidden_size": optional(count),
    "num_hidden_layers": optional(count), "n_layer": optional(count), "vocab_size": optional(count),
    "num_labels": optional(count), "max_position_embeddings": optional(count), "id2label": optional(map_of(text)),
    "torch_dtype": optional(text), "dtype": optional(text), "quantization_config": optional(mapping),
}


def adapter_config(config: Mapping[str, Any], variant: Any, where: str | Path) -> None:
    """The shared fields and the variant's own (`config_types`) have the types they must have."""
    check_fields(config, {**ADAPTER_FIELDS, **spec.option(variant, "config_types")}, where)


def adapter_source(adapter: Any) -> Path:
    """The file an adapter's config comes from, for messages: the JSON file its format read (a config
    file of its own), else its weights file (a config in the header's metadata)."""
    store = adapter.store
    return (store.json_read or store.files or [store.root])[0]


def model_config(config: Mapping[str, Any] | None, where: str | Path) -> dict | None:
    """A model's config.json (or None), its fields that adaptkit reads checked."""
    if config is not None:
        check_fields(config, MODEL_FIELDS, where)
    return config
