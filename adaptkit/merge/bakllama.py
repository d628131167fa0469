"""bakllama configs (mergekit's `bakllama` script, the first frankenmerge format), read as the recipe
that script runs: a merge of one slice per entry of `layer_slices` by the method registry.toml names
for the role (`[default.merge] bakllama`: mergekit's passthrough, layers copied, times its one parameter).

    layer_slices:                       merge_method: passthrough
      - model: ./a                      slices:
        start: 0                          - sources:
        end: 16                               - model: ./a
      - model: ./b            ->                layer_range: [0, 16]
        start: 8                          - sources:
        end: 24                               - model: ./b
        scale: 0.5                              layer_range: [8, 24]
                                                parameters: {scale: [{filter: down_proj, value: 0.5}]}

`scale` multiplies only the slice's `down_proj` weights, as the script's filter does. `embedding_source`
and `lm_head_source` are parsed by the script and used nowhere (the embeddings come from the first
slice's model, the final norm and LM head from the last one's, as with any slices): given another
model they are refused, since honouring them would not be mergekit's merge and ignoring them would not
be the user's. The script's `--fp16` is `--dtype float16` here.
"""
from __future__ import annotations

from typing import Any

from .. import registry
from .. import validate as v
from ..errors import AdaptkitError

KEYS = ("layer_slices", "embedding_source", "lm_head_source")
SLICE = {"model": v.text, "start": v.count, "end": v.count, "scale": v.optional(v.number)}  # an entry's keys


def is_bakllama(data: Any) -> bool:
    """A recipe mapping in bakllama's format (its one required key, which mergekit-yaml lacks)."""
    return isinstance(data, dict) and "layer_slices" in data


def as_recipe(data: dict[str, Any], src: str) -> dict[str, Any]:
    """The mergekit-yaml recipe the bakllama script builds from `data` (module docstring)."""
    if unknown := sorted(map(str, set(data) - set(KEYS))):
        raise AdaptkitError(f"{src}: unknown key in a bakllama config: {', '.join(unknown)} (keys: {', '.join(KEYS)})")
    method = registry.default("merge", "bakllama")
    (factor,) = registry.get("merge", method).params  # the role's method has one parameter, the factor
    entries = data["layer_slices"]
    if not isinstance(entries, list) or not entries:
        raise AdaptkitError(f"{src}: layer_slices must be a non-empty list of {{model, start, end[, scale]}}")
    slices = []
    for i, entry in enumerate(entries):
        where = f"{src}: layer_slices[{i}]"
        v.record(SLICE)(entry, where)
        if unknown := sorted(map(str, set(entry) - set(SLICE))):
            raise AdaptkitError(f"{where}: unknown key {', '.join(unknown)} (keys: {', '.join(SLICE)})")
        if missing := [key for key in ("model", "start", "end") if key not in entry]:
            raise AdaptkitError(f"{where}: '{missing[0]}' is missing")
        source: dict[str, Any] = {"model": entry["model"], "layer_range": [entry["start"], entry["end"]]}
        if entry.get("scale") is not None:
            source["parameters"] = {factor: [{"filter": "down_proj", "value": entry["scale"]}]}
        slices.append({"sources": [source]})
    for key, place, model in (("embedding_source", "first", entries[0]["model"]),
                              ("lm_head_source", "last", entries[-1]["model"])):
        if data.get(key) is not None and data[key] != model:
            raise AdaptkitError(f"{src}: {key} {v.short(data[key])}: mergekit's bakllama reads it nowhere and takes "
                                f"them from the {place} slice's model ({model}); give that model or leave the key out")
    return {"merge_method": method, "slices": slices}
