"""`adaptkit hub push`: upload an adapter folder, the files its format plugin reads plus a generated
model card, in one commit."""
from __future__ import annotations

from pathlib import Path

from .. import registry
from ..adapter import describe, read_adapter
from ..errors import AdaptkitError
from ..io.store import open_store
from .card import CARD, model_card
from .client import api as client, call, is_offline, repo_problem, shown


def push(folder: str | Path, repo: str, *, private: bool = False, message: str | None = None,
         allow_pickle: bool = False) -> dict:
    """Upload the adapter in `folder` to `repo` (created if needed) with a generated model card
    (base model, variant, rank; tags: the canonical format and variant, adaptkit, its own variant).
    Returns {repo, commit, url, files, private}."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder).expanduser()
    problem = repo_problem(repo)
    if problem:
        raise AdaptkitError(f"{shown(repo)}: not a repository id (org/name): {problem}")
    if not folder.is_dir():
        raise AdaptkitError(f"{folder}: no such adapter folder")
    store = open_store(folder, allow_pickle=allow_pickle)
    adapter = read_adapter(store)
    if adapter is None:
        kind = "quantized-model" if registry.detect("quantizer", store) else "model"
        raise AdaptkitError(f"{folder} is a {kind}, not an adapter: `hub push` uploads adapters")
    if is_offline():
        raise AdaptkitError(f"pushing to {repo} needs the Hub, but HF_HUB_OFFLINE is set")
    # What the adapter's format plugin reads (weights, a shard index, its JSON config), whatever the format.
    used = [*store.files, *([store.index] if store.index else []), *store.json_read]
    files = sorted({p.relative_to(store.root).as_posix() for p in used} - {CARD})
    existing = (folder / CARD).read_text(encoding="utf-8") if (folder / CARD).is_file() else None
    card = model_card(describe(adapter), repo, existing)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode("utf-8")))
    api = client()
    call(lambda: api.create_repo(repo, private=private, exist_ok=True), repo=repo)
    variant = adapter.variant
    # A commit is not retried: one that landed but whose answer was lost would be made twice.
    info = call(lambda: api.create_commit(repo, operations=operations,
                                          commit_message=message or f"Upload {variant} adapter with adaptkit"),
                repo=repo, retries=0)
    return {"repo": repo, "commit": info.oid, "url": info.commit_url, "files": [*files, CARD], "private": private}
