"""The model card `adaptkit hub push` uploads: YAML metadata the Hub indexes (base_model, tags, library)
and a short summary of the adapter."""
from __future__ import annotations

import re

from .. import registry, spec
from .client import repo_problem

CARD = "README.md"  # the Hub's model card


def model_card(adapter: dict, repo: str, existing: str | None = None) -> str:
    """README.md for an adapter: YAML metadata the Hub indexes (base_model, tags, library) and a summary;
    the body (and extra metadata) of an existing card are kept."""
    import yaml

    meta, body = split_card(existing or "")
    variant, base = adapter["variant"], adapter.get("base_model")
    # The adapter's format (with the Hub's library name where the format gives one) and the plain low-rank variant.
    fmt = registry.get("format", adapter["format"])
    plain = registry.default("variant")
    tags = list(dict.fromkeys([*(meta.get("tags") or []), fmt.name, plain, "adaptkit", variant]))
    meta["tags"] = tags
    library = spec.option(fmt, "hub_library")
    if library:
        meta["library_name"] = library
    if base and repo_problem(base) is None:  # a local path (or anything else) is no Hub base_model
        meta["base_model"] = base
    rank = adapter.get("rank")
    ranks = adapter.get("ranks")
    if rank is None and isinstance(ranks, (list, dict)) and ranks:
        values = sorted(set(ranks.values() if isinstance(ranks, dict) else ranks))
        rank = f"{values[0]}–{values[-1]}"
    if not body.strip():
        name = repo.split("/")[1]
        targets = adapter.get("target_modules")
        targets = ", ".join(targets) if isinstance(targets, list) else targets
        rows = [("variant", variant), ("rank", rank), ("base model", base), ("target modules", targets),
                ("trainable parameters", adapter.get("trainable_parameters"))]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
        body = (f"# {name}\n\nA {variant} adapter{f' (rank {rank})' if rank is not None else ''}"
                f"{f' for `{base}`' if base else ''}, uploaded with adaptkit.\n\n| | |\n|---|---|\n{table}\n\n"
                f"## Use\n\n```console\n$ adaptkit hub pull {repo}\n"
                f"$ adaptkit merge --base {base or 'BASE'} -m {name} -o merged/\n```\n\n")
        usage = spec.option(fmt, "card_usage")
        body += f"{usage.replace('{repo}', repo)}\n" if usage else ""
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n{body.lstrip()}"


def split_card(text: str) -> tuple[dict, str]:
    import yaml

    m = re.match(r"^---\s*\n(.*?)\n---\s*\n?(.*)$", text, re.S)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), m.group(2)
