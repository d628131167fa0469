"""Human-readable text for the CLI's reports (the `--json` forms are the dicts themselves)."""
from __future__ import annotations

import re
from typing import Any

from .. import registry, spec


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


#: A layer index in a module path: the first dotted number ("model.layers.3.mlp" -> 3).
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def summarize(names: Any, limit: int = 6, noun: str = "modules") -> str:
    """A list a reader takes in at a glance: all of it when it is short, else its distinct last parts and the
    count ("q_proj, k_proj, … (48 modules in 12 layers)"); a string (a regex) as it is."""
    if isinstance(names, str) or not isinstance(names, (list, tuple, set)):
        return str(names)
    names = [str(n) for n in names]
    if len(names) <= limit:
        return ", ".join(names)
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    layers = {found.group(1) for n in names if (found := _LAYER.search(n))}
    shown = ", ".join(leaves[:limit]) + (", …" if len(leaves) > limit else "")
    return f"{shown} ({len(names)} {noun}{f' in {len(layers)} layers' if layers else ''})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def format_inspect(r: dict[str, Any]) -> str:
    lines = [r["path"]]

    def row(label: str, value: Any) -> None:
        lines.append(f"  {label:<20} {value}")  # a longer label (a config key) still gets its space

    what = r["kind"]
    if r["model"]:
        arch = ", ".join(r["model"].get("architectures") or [])
        what += f" ({r['model'].get('model_type', '?')}{', ' + arch if arch else ''})"
    if r["quantization"]:
        what += f", {r['quantization']['method']}"
    model = r["model"] or {}
    own = "; adaptkit format (only adaptkit reads its variant)" if (r["adapter"] or {}).get("adaptkit_format") else ""
    row("kind", f"{what}; {r['format']} format{own}")
    row("tensors", f"{r['tensors']} in {len(r['shards'])} file(s), {human_count(r['parameters'])} parameters, "
        f"{human_bytes(r['bytes'])}")
    row("dtypes", "; ".join(f"{k}: {v['tensors']} tensors" for k, v in sorted(r["dtypes"].items())))
    for key, label in (("hidden_size", "hidden size"), ("num_hidden_layers", "layers"), ("vocab_size", "vocab size")):
        if model.get(key) is not None:  # config.json's figures (inspection.MODEL_FIELDS)
            row(label, _fmt(model[key]))
    if len(r["shards"]) > 1:
        for s in r["shards"]:
            row("", f"{s['file']}  {s['tensors']} tensors, {human_bytes(s['bytes'])}")
    a = r["adapter"]
    if a:
        row("variant", a["variant"])
        if a.get("unsupported"):  # load, merge and convert refuse it: the reason, as they give it
            row("unsupported", a["unsupported"])
        row("base model", a["base_model"] or "(not recorded)")
        if "ranks" in a:
            row("rank", a["rank"] if a["rank"] is not None else f"{min(a['ranks'])}..{max(a['ranks'])} (varies)")
        for key in spec.option(registry.get("variant", a["variant"]), "inspect_rows"):
            if isinstance(a.get(key), bool):  # a flag: shown when set
                if a[key]:
                    row(key, "yes")
            elif key in a:
                row(key, _fmt(a[key]))
        row("target modules", summarize(a["target_modules"]))
        row("targeted modules", a["targeted_modules"])
        if a["modules_to_save"]:
            row("modules to save", summarize(a["modules_to_save"]))
        row("trainable parameters", f"{human_count(a['trainable_parameters'])} ({a['trainable_parameters']})")
    return "\n".join(lines)
