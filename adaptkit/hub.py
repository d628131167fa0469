"""The Hugging Face Hub, through huggingface_hub only (never HTTP of our own).

`search` finds adapters by their tags; `pull` downloads an adapter's files (config, weights, card) into
the shared HF cache, checks sizes and hashes, and pins the commit in `adaptkit.lock`; `sync` re-resolves
and verifies every lock entry (`offline=True`: from the cache alone); `push` uploads an adapter with a
generated model card. `resolve` turns a path, a lock name or `org/name[@rev]` into a local folder.

`HF_ENDPOINT` and `HF_HUB_OFFLINE` are read at call time; tokens come from huggingface_hub's usual
places (HF_TOKEN, `hf auth login`) and are never printed.
"""
from __future__ import annotations

from pathlib import Path

from . import lockfile, registry
from .errors import AdaptkitError, unknown_name
from .hub_cache import Expected, download_file, expected_from_lock, materialize
from .hub_client import REPO_REF, api as client, call, endpoint, is_offline, transient
from .lockfile import LOCK_FILE, Entry, FileRecord

# Only what loading a model needs: weights, configs, tokenizers, model cards.
WANTED = ["*.safetensors", "*.json", "*.model", "*.txt", "*.md", "tokenizer*"]
SORTS = {"downloads": "downloads", "likes": "likes", "updated": "lastModified"}
EXPAND = ["downloads", "likes", "lastModified", "tags", "cardData", "library_name"]
ADAPTER_CONFIG = "adapter_config.json"
CARD = "README.md"


def default_tags() -> tuple[str, ...]:
    """The tags adapters carry on the Hub: the plain low-rank variant's, the canonical format's
    (PEFT's layout) and "adapter"."""
    return registry.default("variant"), registry.default("format"), "adapter"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); anything else is an error."""
    m = REPO_REF.match(ref)
    if not m:
        raise AdaptkitError(f"{ref}: no such file or folder, and not a Hub reference (org/name[@revision])")
    return m.group("repo"), m.group("rev")


def resolve(ref: str) -> Path:
    """A local path; else a name in ./adaptkit.lock (its pinned commit, from the cache when there);
    else `org/name[@rev]` fetched through huggingface_hub (an `org/name` in the lock: its pinned commit)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    entry = lock_entry(ref)
    if entry is not None:
        return locked_folder(entry)
    if not REPO_REF.match(ref):
        where = f"not a name in {LOCK_FILE}, " if Path(LOCK_FILE).is_file() else ""
        raise AdaptkitError(f"{ref}: no such file or folder, {where}and not a Hub reference (org/name[@revision])")
    return download(ref)


def lock_entry(ref: str) -> Entry | None:
    """The ./adaptkit.lock entry `ref` stands for: a lock name, or an `org/name` (no @rev) pinned there."""
    if not Path(LOCK_FILE).is_file():
        return None
    lock = lockfile.read(LOCK_FILE)
    entry = lock.entries.get(ref)
    if entry is None and REPO_REF.match(ref) and "@" not in ref:
        entry = lock.by_repo(ref)
    return entry


def is_reference(ref: str) -> bool:
    """`org/name[@rev]` or a name pinned in ./adaptkit.lock: something `resolve` looks up, not a path."""
    return bool(REPO_REF.match(ref)) or lock_entry(ref) is not None


def download(ref: str) -> Path:
    """Fetch (or find in the HF cache) the files of `org/name[@rev]`; returns the snapshot folder."""
    repo, revision = parse_ref(ref)
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=WANTED,
                                                      endpoint=endpoint(), local_files_only=is_offline()))
    except errors.RevisionNotFoundError:
        raise AdaptkitError(f"{ref}: revision '{revision}' not found in {repo}") from None
    except errors.RepositoryNotFoundError:
        raise AdaptkitError(f"{ref}: no such file or folder, and no Hub repository '{repo}'") from None
    except Exception as e:
        if isinstance(e, OSError) or transient(e):  # LocalEntryNotFoundError is an OSError too
            raise AdaptkitError(f"{ref}: not a local path, and the Hub cannot be reached ({type(e).__name__})") \
                from None
        raise


# ---------------------------------------------------------------------------------------------- search


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


# ------------------------------------------------------------------------------------------------ pull


def pull(ref: str, *, name: str | None = None, lock: str | Path = LOCK_FILE, progress: bool = False) -> dict:
    """Download the adapter `org/name[@rev]` (config, weights, card) into the HF cache, verify each file
    against the Hub's size and hash, and pin it as `name` (default: the repo's name) in the lock."""
    m = REPO_REF.match(ref)
    if not m:
        raise AdaptkitError(f"{ref}: not a Hub reference (org/name[@revision])")
    repo, revision = m.group("repo"), m.group("rev") or "main"
    name = name or repo.split("/")[1]
    if not lockfile.NAME.match(name):
        raise AdaptkitError(f"'{name}' cannot be a lock name: use letters, digits, '.', '_' and '-' (--name)")
    locked = lockfile.read(lock)
    taken = locked.entries.get(name)
    if taken is not None and taken.repo != repo:
        raise AdaptkitError(f"the name '{name}' already pins {taken.repo} in {locked.path}; choose another with --name")
    if is_offline():
        raise AdaptkitError(f"pulling {ref} needs the Hub, but HF_HUB_OFFLINE is set "
                            "(`adaptkit hub sync --offline` checks what the cache holds)")
    api = client()
    commit = call(lambda: api.model_info(repo, revision=revision), repo=repo, rev=revision).sha
    remote = remote_adapter_files(api, repo, commit)
    fetched = materialize(repo, commit, remote, offline=False, progress=progress)
    figures = _figures(fetched.folder)
    locked.entries[name] = Entry(name=name, repo=repo, revision=revision, commit=commit, files=fetched.records,
                                 variant=figures.get("variant"), base_model=figures.get("base_model"))
    locked.write()
    return {"name": name, "repo": repo, "revision": revision, "commit": commit, "folder": str(fetched.folder),
            "variant": figures.get("variant"), "base_model": figures.get("base_model"), "lock": str(locked.path),
            "files": {p: {"size": r.size, "sha256": r.sha256} for p, r in fetched.records.items()},
            "downloaded": fetched.downloaded, "repaired": fetched.repaired}


def remote_adapter_files(api, repo: str, commit: str) -> dict[str, Expected]:
    """The adapter's files at `commit` (config, weights, card) with what each must hash to; a repo
    whose file names leave its folder, or that holds no adapter, is an error saying what it is."""
    from huggingface_hub.hf_api import RepoFile

    tree = call(lambda: list(api.list_repo_tree(repo, revision=commit, recursive=True)), repo=repo, rev=commit,
                retries=0)  # retried by huggingface_hub itself
    for item in tree:
        if not lockfile.safe_file_name(item.path):
            raise AdaptkitError(f"{repo}@{commit[:7]} lists a file named '{item.path}', which would land outside "
                                "its folder; refused")
    files = {f.path: f for f in tree if isinstance(f, RepoFile)}
    if ADAPTER_CONFIG not in files:
        single = _single_file_adapter(api, repo, commit, files)
        if single is None:
            raise AdaptkitError(_not_an_adapter(api, repo, commit, files))
        wanted = [single] + ([CARD] if CARD in files else [])
        return {p: Expected(files[p].size, files[p].lfs.sha256 if files[p].lfs else None, files[p].blob_id) for p in wanted}
    weights = [p for p in files if "/" not in p and p.startswith("adapter_model") and p.endswith(".safetensors")]
    weights = weights or [p for p in files if "/" not in p and p.startswith("adapter_model")
                          and p.endswith((".bin", ".pt"))]
    if not weights:
        raise AdaptkitError(f"{repo}@{commit[:7]} has {ADAPTER_CONFIG} but no adapter weights "
                            "(adapter_model.safetensors)")
    wanted = [ADAPTER_CONFIG, *sorted(weights)] + ([CARD] if CARD in files else [])
    return {p: Expected(files[p].size, files[p].lfs.sha256 if files[p].lfs else None, files[p].blob_id) for p in wanted}


def _single_file_adapter(api, repo: str, commit: str, files: dict) -> str | None:
    """The one root-level .safetensors file a format plugin reads as an adapter (Stable Diffusion LoRAs
    often ship as a single file, no adapter_config.json), judged from its header alone (a ranged read;
    a full model's weights are never downloaded for this); None if there is none."""
    from .adapter import detect_format
    from .io import TensorInfo, TensorStore

    if "config.json" in files:  # a transformers model folder
        return None
    found = []
    for path in sorted(p for p in files if "/" not in p and p.endswith(".safetensors")):
        header = call(lambda: api.parse_safetensors_file_metadata(repo, path, revision=commit), repo=repo, rev=commit)
        infos = {k: TensorInfo(k, t.dtype, tuple(t.shape), Path(path)) for k, t in header.tensors.items()}
        if detect_format(TensorStore(Path(f"{repo}@{commit}"), infos, dict(header.metadata or {}))) is not None:
            found.append(path)  # formats detect from headers alone (their contract)
    if len(found) > 1:
        raise AdaptkitError(f"{repo}@{commit[:7]} holds several single-file adapters ({', '.join(found[:4])}); "
                            "one adapter per repository is supported")
    return found[0] if found else None


def _not_an_adapter(api, repo: str, commit: str, files: dict) -> str:
    names = sorted(p for p in files if p != ".gitattributes")
    if "config.json" in files:
        info = call(lambda: api.model_info(repo, revision=commit), repo=repo, rev=commit)
        config = info.config if isinstance(getattr(info, "config", None), dict) else {}
        if not config:
            config = _read_json(download_file(repo, commit, "config.json"))
        arch = ", ".join(config.get("architectures") or []) or config.get("model_type") or "no architecture named"
        return f"{repo} is a full model ({arch}), not an adapter: use it as a base (--base {repo})"
    if not names:
        return f"{repo} is not an adapter: the repository is empty"
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return f"{repo} is not an adapter: no {ADAPTER_CONFIG} (it holds {shown})"


def _read_json(path: str | Path) -> dict:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _figures(folder: Path) -> dict:
    from .inspection import inspect

    return inspect(folder)["adapter"] or {}


# ------------------------------------------------------------------------------------------ lock names


def locked_folder(entry: Entry) -> Path:
    """The cached snapshot of a lock entry, every file verified against the lock (fetched if missing
    and the Hub can be reached)."""
    fetched = materialize(entry.repo, entry.commit, expected_from_lock(entry), offline=is_offline())
    bad = fetched.missing + fetched.corrupt
    if bad:
        state = "not in the cache" if bad[0] in fetched.missing else "corrupt in the cache"
        raise AdaptkitError(f"{entry.name} ({LOCK_FILE}: {entry.repo}@{entry.commit[:7]}): {bad[0]} is {state} and "
                            "HF_HUB_OFFLINE is set; run `adaptkit hub sync` online")
    return fetched.folder


# ------------------------------------------------------------------------------------------------ sync


def sync(*, update: bool = False, offline: bool = False, lock: str | Path = LOCK_FILE, progress: bool = False) -> dict:
    """For every lock entry: re-resolve its revision on the Hub, download what the cache lacks and verify
    every file against the lock. `update` moves unpinned entries (a branch or tag, not a commit) to
    the revision's newest commit and reports the file diff. `offline` (or HF_HUB_OFFLINE) checks the
    cache alone and reports what is missing or corrupt. Returns {lock, offline, ok, entries}."""
    locked = lockfile.read(lock)
    offline = offline or is_offline()
    api = None if offline else client()
    rows, changed = [], False
    for entry in locked.entries.values():
        row = {"name": entry.name, "repo": entry.repo, "revision": entry.revision, "commit": entry.commit,
               "pinned": entry.pinned, "latest": None, "diff": None, "downloaded": [], "repaired": [],
               "missing": [], "corrupt": []}
        if offline:
            fetched = materialize(entry.repo, entry.commit, expected_from_lock(entry), offline=True)
        else:
            latest = call(lambda: api.model_info(entry.repo, revision=entry.revision),
                          repo=entry.repo, rev=entry.revision).sha
            row["latest"] = latest
            if update and latest != entry.commit and not entry.pinned:
                fetched = materialize(entry.repo, latest, remote_adapter_files(api, entry.repo, latest), offline=False,
                                      progress=progress)
                row["diff"] = _diff(entry.files, fetched.records)
                figures = _figures(fetched.folder)
                entry.commit, entry.files = latest, fetched.records
                entry.variant, entry.base_model = figures.get("variant"), figures.get("base_model")
                row["commit"], changed = latest, True
            else:
                fetched = materialize(entry.repo, entry.commit, expected_from_lock(entry), offline=False,
                                      progress=progress)
        for key in ("downloaded", "repaired", "missing", "corrupt"):
            row[key] = getattr(fetched, key)
        row["status"] = ("incomplete" if row["missing"] or row["corrupt"] else "updated" if row["diff"] is not None
                         else "repaired" if row["repaired"] else "downloaded" if row["downloaded"] else "ok")
        rows.append(row)
    if changed:
        locked.write()
    return {"lock": str(locked.path), "offline": offline, "ok": all(r["status"] != "incomplete" for r in rows),
            "entries": rows}


def _diff(old: dict[str, FileRecord], new: dict[str, FileRecord]) -> dict[str, list[str]]:
    return {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
            "changed": sorted(p for p in set(old) & set(new) if old[p].sha256 != new[p].sha256)}


# ------------------------------------------------------------------------------------------------ push


def push(folder: str | Path, repo: str, *, private: bool = False, message: str | None = None) -> dict:
    """Upload the adapter in `folder` to `repo` (created if needed) with a generated model card
    (base model, variant, rank; tags: the canonical format and variant, adaptkit, its own variant).
    Returns {repo, commit, url, files, private}."""
    from huggingface_hub import CommitOperationAdd

    from .hub_card import model_card
    from .inspection import inspect

    folder = Path(folder).expanduser()
    if not REPO_REF.match(repo) or "@" in repo:
        raise AdaptkitError(f"{repo}: not a repository id (org/name)")
    if not folder.is_dir():
        raise AdaptkitError(f"{folder}: no such adapter folder")
    report = inspect(folder)
    if report["kind"] != "adapter":
        raise AdaptkitError(f"{folder} is a {report['kind']}, not an adapter: `hub push` uploads adapters")
    if is_offline():
        raise AdaptkitError(f"pushing to {repo} needs the Hub, but HF_HUB_OFFLINE is set")
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CARD and (
        p.name == ADAPTER_CONFIG or p.name.startswith("adapter_model")))
    existing = (folder / CARD).read_text(encoding="utf-8") if (folder / CARD).is_file() else None
    card = model_card(report["adapter"], repo, existing)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode("utf-8")))
    api = client()
    call(lambda: api.create_repo(repo, private=private, exist_ok=True), repo=repo)
    variant = report["adapter"]["variant"]
    # A commit is not retried: one that landed but whose answer was lost would be made twice.
    info = call(lambda: api.create_commit(repo, operations=operations,
                                          commit_message=message or f"Upload {variant} adapter with adaptkit"),
                repo=repo, retries=0)
    return {"repo": repo, "commit": info.oid, "url": info.commit_url, "files": [*files, CARD], "private": private}
