"""Model references as recipes write them (mergekit's `ModelReference`).

A string: a folder, `org/name[@revision]`, or `model+adapter` (the adapter merged into the model first).
A mapping, as mergekit also reads one: `{model: M, lora: L}`, where M and L are such strings or
`{path, revision}` mappings; `override_architecture` (mergekit reads the model as another architecture)
is refused by name, and so is any other key: a reference never silently means less than it says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import AdaptkitError
from ..validate import short

PATH_KEYS = {"path", "revision"}


@dataclass(frozen=True)
class Ref:
    """A model reference: `path_or_repo` plus adapters to merge into it first (`base+adapter`)."""

    model: str
    adapters: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: Any, where: str = "model reference") -> Ref:
        if isinstance(text, dict):
            text = _from_mapping(text, where)
        if not isinstance(text, str) or not text.strip():
            raise AdaptkitError(f"{where} must be a path or repo id, got {short(text)}")
        model, *adapters = text.split("+")
        if not all(part.strip() for part in (model, *adapters)):
            raise AdaptkitError(f"model reference {short(text)} has an empty part around '+'")
        return cls(model, tuple(adapters))

    def __str__(self) -> str:
        return "+".join((self.model, *self.adapters))


def _from_mapping(given: dict, where: str) -> str:
    """`{model, lora}` as the string `model[+lora]`, each part `path[@revision]`."""
    if "override_architecture" in given:
        raise AdaptkitError(f"{where}: 'override_architecture' is not supported (adaptkit reads each model as the "
                            f"architecture its config.json names)")
    unknown = sorted(map(str, set(given) - {"model", "lora"}))
    if unknown or "model" not in given:
        raise AdaptkitError(f"{where}: a model reference mapping has 'model' and optionally 'lora', got "
                            f"{', '.join(unknown) if unknown else 'no model'}")
    parts = [_path(given[key], f"{where}.{key}") for key in ("model", "lora") if given.get(key) is not None]
    return "+".join(parts)


def _path(given: Any, where: str) -> str:
    """A path string, or a `{path, revision}` mapping as `path[@revision]`."""
    if isinstance(given, str):
        return given
    if not isinstance(given, dict):
        raise AdaptkitError(f"{where} must be a path or repo id, got {short(given)}")
    unknown = sorted(map(str, set(given) - PATH_KEYS))
    if unknown or not isinstance(given.get("path"), str):
        raise AdaptkitError(f"{where}: a model path mapping has a 'path' string and optionally 'revision', got "
                            f"{short(given)}")
    revision = given.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise AdaptkitError(f"{where}.revision must be a name or commit, got {short(revision)}")
    return given["path"] + (f"@{revision}" if revision else "")
