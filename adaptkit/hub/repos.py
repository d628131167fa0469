"""Adapter repositories on the Hub, through huggingface_hub only (never HTTP of our own).

`pull` downloads an adapter's files into the shared HF cache (the files its format plugin's
`RemoteLayout` names, or the one root-level .safetensors file a format detects from its header, plus
the card), checks sizes and hashes, and pins the commit in `adaptkit.lock`; `sync` re-resolves and
verifies every lock entry (`offline=True`: from the cache alone). `resolve` turns a lock name or
`org/name[@rev]` into a local folder, and `resolve_path` any path, lock name or reference.

`HF_ENDPOINT` and `HF_HUB_OFFLINE` are read at call time; tokens come from huggingface_hub's usual
places (HF_TOKEN, `hf auth login`) and are never printed.
"""
from __future__ import annotations

from pathlib import Path

from . import lockfile
from .. import registry
from ..adapter import describe, detect_format, read_adapter
from ..errors import AdaptkitError
from ..io.safetensors_file import TensorInfo
from ..io.store import WEIGHT_SUFFIXES, TensorStore
from ..capabilities import RemoteLayout
from .card import CARD
from .cache import Expected, download_file, expected_from_lock, materialize
from .client import (REPO_REF, HubUnreachable, api as client, call, detail, endpoint, explain, hub_session,
                         is_offline, quoted, repo_problem, revision_problem, shown)
from .lockfile import LOCK_FILE, Entry, FileRecord

# Only what loading a model needs: weights, configs, tokenizers (chat_template.jinja too), model cards.
WANTED = ["*.safetensors", "*.json", "*.model", "*.txt", "*.md", "tokenizer*", "*.jinja"]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); anything else is an error (the repo id checked by
    huggingface_hub's rules, the revision a name that stays under the cache's refs/)."""
    problem = ref_problem(ref)
    if problem:
        raise AdaptkitError(f"{shown(ref)}: no such file or folder, and not a Hub reference (org/name[@revision]): "
                            f"{problem}")
    m = REPO_REF.match(ref)
    return m.group("repo"), m.group("rev")


def ref_problem(ref) -> str | None:
    """Why `ref` is not `org/name[@revision]`, or None if it is one."""
    m = REPO_REF.match(ref) if isinstance(ref, str) else None
    if not m and isinstance(ref, str) and "/" not in ref:
        return "no 'org/' before the name"
    if not m:
        return "it holds characters or parts a Hub reference cannot have"
    return repo_problem(m.group("repo")) or (revision_problem(m.group("rev")) if m.group("rev") else None)


def is_hub_ref(ref: str) -> bool:
    """`org/name[@rev]` with a repo id and revision huggingface_hub accepts (`../models` matches the
    pattern, but is a path)."""
    return ref_problem(ref) is None


def resolve(ref: str) -> Path:
    """A local path; else a name in ./adaptkit.lock (its pinned commit, from the cache when there);
    else `org/name[@rev]` fetched through huggingface_hub (an `org/name` in the lock: its pinned commit)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    entry = lock_entry(ref)
    if entry is not None:
        return locked_folder(entry)
    if not is_hub_ref(ref):
        where = f"not a name in {LOCK_FILE}, " if Path(LOCK_FILE).is_file() else ""
        raise AdaptkitError(f"{shown(ref)}: no such file or folder, {where}and not a Hub reference "
                            "(org/name[@revision])")
    return download(ref)


def lock_entry(ref: str) -> Entry | None:
    """The ./adaptkit.lock entry `ref` stands for: a lock name, an `org/name` pinned there, or an
    `org/name@<commit>` pinned at that very commit (its files are verified against the lock, and need
    no Hub once cached)."""
    if not Path(LOCK_FILE).is_file():
        return None
    lock = lockfile.read(LOCK_FILE)
    entry = lock.entries.get(ref)
    if entry is None and is_hub_ref(ref):
        repo, rev = parse_ref(ref)
        entry = lock.by_repo(repo, commit=rev) if rev is None or lockfile.COMMIT.match(rev) else None
    return entry


def is_reference(ref: str) -> bool:
    """`org/name[@rev]` or a name pinned in ./adaptkit.lock: something `resolve` looks up, not a path.
    Every reader of a path that may name a Hub repository asks this (merge inputs, bases, `inspect`,
    `load_adapter`); it imports huggingface_hub only to check a repo id, never at module import."""
    return is_hub_ref(ref) or lock_entry(ref) is not None


def download(ref: str) -> Path:
    """Fetch (or find in the HF cache) the files of `org/name[@rev]`; returns the snapshot folder."""
    repo, revision = parse_ref(ref)
    import huggingface_hub
    from huggingface_hub import errors

    with hub_session():  # a refused connection is not retried; huggingface_hub falls back to the cache itself
        try:
            return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=WANTED,
                                                          endpoint=endpoint(), local_files_only=is_offline()))
        except errors.RevisionNotFoundError:
            raise AdaptkitError(f"{ref}: revision '{revision}' not found in {repo}") from None
        except errors.RepositoryNotFoundError:
            raise AdaptkitError(f"{ref}: no such file or folder, and no Hub repository '{repo}'") from None
        except Exception as e:
            explained = explain(e, repo=repo, rev=revision, file=None, what=None, tries=1)
            if isinstance(explained, HubUnreachable):
                raise AdaptkitError(f"{ref}: not a local path, and the Hub cannot be reached at {explained.endpoint} "
                                    f"({explained.why}); the cache does not hold it either") from None
            if is_offline() and isinstance(e, errors.LocalEntryNotFoundError):
                raise AdaptkitError(f"{ref}: not a local path, and the Hub cannot be reached (HF_HUB_OFFLINE is set "
                                    "and the cache does not hold it)") from None
            if explained is None and isinstance(e, (ValueError, KeyError, TypeError, AttributeError)):
                # huggingface_hub refusing a file name that would leave the snapshot folder (ValueError), or
                # an answer it cannot read (a field missing or of the wrong kind)
                raise AdaptkitError(f"{ref}: huggingface_hub refused what the Hub at {endpoint()} sent "
                                    f"({type(e).__name__}: {detail(e)})") from None
            if explained is None:
                raise
            raise explained from None


# ------------------------------------------------------------------------------------------------ pull


def pull(ref: str, *, name: str | None = None, lock: str | Path = LOCK_FILE, progress: bool = False,
         allow_pickle: bool = False) -> dict:
    """Download the adapter `org/name[@rev]` (config, weights, card) into the HF cache, verify each file
    against the Hub's size and hash, and pin it as `name` (default: the repo's name) in the lock."""
    problem = ref_problem(ref)
    if problem:
        raise AdaptkitError(f"{shown(ref)}: not a Hub reference (org/name[@revision]): {problem}")
    repo, revision = parse_ref(ref)
    revision = revision or "main"
    name = name or repo.split("/")[1]
    if not lockfile.NAME.match(name):
        raise AdaptkitError(f"{shown(name)} cannot be a lock name: use letters, digits, '.', '_' and '-' (--name)")
    locked = lockfile.read(lock)
    taken = locked.entries.get(name)
    if taken is not None and taken.repo != repo:
        raise AdaptkitError(f"the name '{name}' already pins {taken.repo} in {locked.path}; choose another with --name")
    if is_offline():
        raise AdaptkitError(f"pulling {ref} needs the Hub, but HF_HUB_OFFLINE is set "
                            "(`adaptkit hub sync --offline` checks what the cache holds)")
    api = client()
    commit = resolve_commit(api, repo, revision)
    remote = remote_adapter_files(api, repo, commit)
    fetched = materialize(repo, commit, remote, offline=False, progress=progress)
    figures = _figures(fetched.folder, allow_pickle)
    locked.entries[name] = Entry(name=name, repo=repo, revision=revision, commit=commit, files=fetched.records,
                                 variant=figures.get("variant"), base_model=figures.get("base_model"))
    locked.write()
    return {"name": name, "repo": repo, "revision": revision, "commit": commit, "folder": str(fetched.folder),
            "variant": figures.get("variant"), "base_model": figures.get("base_model"), "lock": str(locked.path),
            "files": {p: {"size": r.size, "sha256": r.sha256} for p, r in fetched.records.items()},
            "downloaded": fetched.downloaded, "repaired": fetched.repaired}


def resolve_commit(api, repo: str, revision: str) -> str:
    """The commit `revision` of `repo` is at on the Hub: 40 hex digits, or the answer is refused (the
    commit names a folder of the cache)."""
    from huggingface_hub import constants

    info = call(lambda: api.model_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT),
                repo=repo, rev=revision)
    if not (isinstance(info.sha, str) and lockfile.COMMIT.match(info.sha)):
        raise AdaptkitError(f"the Hub at {endpoint()} gave {quoted(info.sha)} as the commit of {repo}@{revision}, "
                            "not 40 hex digits; refused")
    return info.sha


def remote_adapter_files(api, repo: str, commit: str) -> dict[str, Expected]:
    """The adapter's files at `commit` (config, weights, card) with what each must hash to; a repo
    whose file names leave its folder, or that holds no adapter, is an error saying what it is."""
    from huggingface_hub.hf_api import RepoFile

    tree = call(lambda: _listing(api, repo, commit), repo=repo, rev=commit, retries=0)  # retried by huggingface_hub
    for item in tree:
        problem = _listing_problem(item, isinstance(item, RepoFile))
        if problem:
            raise AdaptkitError(f"{repo}@{commit[:7]} lists a file named {quoted(item.path)}, {problem}; refused")
    files = {f.path: f for f in tree if isinstance(f, RepoFile)}
    wanted = _layout_files(repo, commit, files)
    if wanted is None:
        single = _single_file_adapter(api, repo, commit, files)
        if single is None:
            raise AdaptkitError(_not_an_adapter(api, repo, commit, files))
        wanted = [single]
    wanted += [CARD] if CARD in files else []
    return {p: Expected(files[p].size, files[p].lfs.sha256 if files[p].lfs else None, files[p].blob_id) for p in wanted}


def _layout_files(repo: str, commit: str, files: dict) -> list[str] | None:
    """The files of the first format plugin (the canonical one first) that knows the repository's layout."""
    for fmt in _layouts():
        try:
            wanted = fmt.remote_files(frozenset(files))
        except AdaptkitError as e:
            raise AdaptkitError(f"{repo}@{commit[:7]} {e}") from None
        if wanted is not None:
            return [p for p in wanted if p in files]
    return None


def _layouts() -> list:
    """The formats that know a repository layout (`RemoteLayout`), the canonical one first."""
    first = registry.default("format")
    found = [registry.get("format", n) for n in sorted(registry.names("format"), key=lambda n: n != first)]
    return [f for f in found if isinstance(f, RemoteLayout)]


def _listing(api, repo: str, commit: str) -> list:
    """The recursive tree listing of `repo@commit`; one whose entries huggingface_hub cannot read (a field
    missing or of the wrong kind) is refused in one line."""
    try:
        return list(api.list_repo_tree(repo, revision=commit, recursive=True))
    except (KeyError, TypeError, AttributeError) as e:
        raise AdaptkitError(f"the Hub at {endpoint()} sent a listing of {repo}@{commit[:7]} that cannot be read "
                            f"({type(e).__name__}: {shown(str(e), 40)}); refused") from None


def _listing_problem(item, is_file: bool) -> str | None:
    """What is wrong with one entry of a tree listing (a server's answer, not to be trusted), or None:
    a name that would leave the download folder, a size or hash that is not one."""
    if not lockfile.safe_file_name(item.path):
        return "which would land outside its folder"
    if not is_file:
        return None
    size = getattr(item, "size", None)
    if type(size) is not int or size < 0:
        return f"with size {quoted(size, 30)}, not a byte count"
    lfs = getattr(item, "lfs", None)
    if lfs is not None and not (isinstance(lfs.sha256, str) and lockfile.SHA256.match(lfs.sha256)):
        return f"with sha256 {quoted(lfs.sha256, 30)}, not 64 hex digits"
    if lfs is None and not (isinstance(item.blob_id, str) and lockfile.COMMIT.match(item.blob_id)):
        return f"with git blob id {quoted(item.blob_id, 30)}, not 40 hex digits"
    return None


def _single_file_adapter(api, repo: str, commit: str, files: dict) -> str | None:
    """The one root-level .safetensors file a format plugin reads as an adapter (Stable Diffusion LoRAs
    often ship as a single file, no adapter_config.json), judged from its header alone (a ranged read;
    a full model's weights are never downloaded for this); None if there is none."""
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
    hints = " or ".join(dict.fromkeys(f.remote_hint for f in _layouts())) or "adapter files"
    return f"{repo} is not an adapter: no {hints} (it holds {shown})"


def _read_json(path: str | Path) -> dict:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _figures(folder: Path, allow_pickle: bool = False) -> dict:
    adapter = read_adapter(folder, allow_pickle=allow_pickle)
    return describe(adapter) if adapter else {}


# ------------------------------------------------------------------------------------------ lock names


def locked_folder(entry: Entry) -> Path:
    """The cached snapshot of a lock entry, every file verified against the lock (fetched if missing
    and the Hub can be reached)."""
    try:
        fetched = materialize(entry.repo, entry.commit, expected_from_lock(entry), offline=is_offline())
    except HubUnreachable as e:  # only asked for when the cache lacks a file (or holds a bad one)
        raise AdaptkitError(f"{entry.name} ({LOCK_FILE}: {entry.repo}@{entry.commit[:7]}): not all of it is in the "
                            f"cache, and the Hub cannot be reached at {e.endpoint} ({e.why}); run `adaptkit hub sync` "
                            "once it can be") from None
    bad = fetched.missing + fetched.corrupt
    if bad:
        state = "not in the cache" if bad[0] in fetched.missing else "corrupt in the cache"
        raise AdaptkitError(f"{entry.name} ({LOCK_FILE}: {entry.repo}@{entry.commit[:7]}): {bad[0]} is {state} and "
                            "HF_HUB_OFFLINE is set; run `adaptkit hub sync` online")
    return fetched.folder


# ------------------------------------------------------------------------------------------------ sync


def sync(*, update: bool = False, offline: bool = False, lock: str | Path = LOCK_FILE, progress: bool = False,
         allow_pickle: bool = False) -> dict:
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
            try:
                latest = resolve_commit(api, entry.repo, entry.revision)
            except HubUnreachable as e:
                raise AdaptkitError(f"{e}, or run `adaptkit hub sync --offline` to check the cache alone") from None
            row["latest"] = latest
            if update and latest != entry.commit and not entry.pinned:
                fetched = materialize(entry.repo, latest, remote_adapter_files(api, entry.repo, latest), offline=False,
                                      progress=progress)
                row["diff"] = _diff(entry.files, fetched.records)
                figures = _figures(fetched.folder, allow_pickle)
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


def resolve_path(ref: str) -> Path:
    """A local path, a name pinned in ./adaptkit.lock, or a Hub reference `org/name[@rev]` fetched
    through huggingface_hub (see `adaptkit.hub.resolve`). Anything else names a missing folder."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not is_reference(ref):
        raise AdaptkitError(f"{ref}: no such {'file' if path.suffix in WEIGHT_SUFFIXES else 'folder'}")
    return resolve(ref)


__all__ = ["download", "is_hub_ref", "is_reference", "lock_entry", "locked_folder", "parse_ref", "pull", "ref_problem",
           "remote_adapter_files", "resolve", "resolve_commit", "resolve_path", "sync"]
