"""Finding adapters on the Hub by their tags (`adaptkit hub search`, `adaptkit.hub.search`)."""
from __future__ import annotations

from .. import registry
from ..errors import AdaptkitError, unknown_name
from .client import api as client, call


SORTS = {"downloads": "downloads", "likes": "likes", "updated": "lastModified"}


EXPAND = ["downloads", "likes", "lastModified", "tags", "cardData", "library_name"]


def default_tags() -> tuple[str, ...]:
    """The tags adapters carry on the Hub: the plain low-rank variant's, the canonical format's
    (PEFT's layout) and "adapter"."""
    return registry.default("variant"), registry.default("format"), "adapter"


def search(query: str | None = None, *, tags=None, base_model: str | None = None,
           author: str | None = None, sort: str = "downloads", limit: int = 20) -> list[dict]:
    """Adapters on the Hub carrying any of `tags` (default: `default_tags()`; the Hub ANDs its filters,
    so one query per tag) and matching `query` in their id, `base_model` and `author`: the best `limit`
    by `sort` (downloads | likes | updated). Rows: repo, variant, base_model, downloads, likes, updated, tags."""
    tags = default_tags() if tags is None else tags
    if sort not in SORTS:
        raise unknown_name("sort", sort, SORTS)
    if limit < 1:
        raise AdaptkitError(f"limit must be at least 1, got {limit}")
    api = client()
    found: dict[str, dict] = {}
    for tag in list(tags) or [None]:
        filters = [f for f in (tag, f"base_model:{base_model}" if base_model else None) if f]
        models = call(lambda: list(api.list_models(filter=filters or None, search=query, author=author,
                                                   sort=SORTS[sort], limit=limit, expand=EXPAND)),
                      what="search", retries=0)  # listing pages are retried by huggingface_hub itself
        for model in models:
            found.setdefault(model.id, _row(model))
    blank = "" if sort == "updated" else 0  # rows are keyed like the sorts; one without the figure goes last
    return sorted(found.values(), key=lambda r: (r[sort] or blank, r["repo"]), reverse=True)[:limit]


def _row(model) -> dict:
    tags = list(model.tags or [])
    return {"repo": model.id, "variant": _variant_from_tags(tags), "base_model": _base_from(tags, model.card_data),
            "downloads": model.downloads or 0, "likes": model.likes or 0,
            "updated": model.last_modified.isoformat() if model.last_modified else None, "tags": tags}


def _variant_from_tags(tags: list[str]) -> str | None:
    """The first tag naming a registered variant; the plain low-rank one only when no other is there
    (it rides along with more specific ones)."""
    known, plain = set(registry.names("variant")), registry.default("variant")
    found = [t.lower() for t in tags if t.lower() in known]
    specific = [t for t in found if t != plain]
    return (specific or found or [None])[0]


def _base_from(tags: list[str], card) -> str | None:
    """The base model from `base_model:[relation:]org/name` tags, else the card's `base_model`."""
    bases = [t.split(":", 1)[1] for t in tags if t.startswith("base_model:")]
    for base in bases:
        relation, _, rest = base.partition(":")
        if rest and relation == "adapter":
            return rest
    plain = [b for b in bases if ":" not in b]
    if plain:
        return plain[0]
    base = getattr(card, "base_model", None) if card is not None else None
    if isinstance(card, dict):
        base = card.get("base_model")
    if isinstance(base, list):
        base = base[0] if base else None
    return base or None


__all__ = ["default_tags", "search"]
