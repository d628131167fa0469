"""Hub files in the shared HF cache, each checked against what it must be (size and sha256, or git blob id):
a bad file is removed, never used."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdaptkitError
from .client import call, endpoint
from .lockfile import Entry, FileRecord


@dataclass
class Expected:
    """What a file must be: its size and sha256 (LFS files, lock entries) or git blob id (regular files)."""

    size: int | None
    sha256: str | None = None
    blob_id: str | None = None


@dataclass
class Fetched:
    """A snapshot folder in the cache, the verified files' records, and what had to be done or is wrong."""

    folder: Path
    records: dict[str, FileRecord] = field(default_factory=dict)
    downloaded: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def expected_from_lock(entry: Entry) -> dict[str, Expected]:
    return {p: Expected(r.size, r.sha256) for p, r in entry.files.items()}


def materialize(repo: str, commit: str, expected: dict[str, Expected], *, offline: bool,
                progress: bool = False) -> Fetched:
    """Make sure each expected file of `repo@commit` is in the HF cache and is what it must be. A bad
    cached file is removed and fetched again; offline, missing and bad files are only reported."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    fetched = Fetched(Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
                      / "snapshots" / commit)
    todo = []
    for path, want in expected.items():
        cached = try_to_load_from_cache(repo, path, revision=commit)
        if isinstance(cached, str):
            record = verify(cached, want)
            if record is not None:
                fetched.records[path] = record
                continue
            fetched.corrupt.append(path)
            if offline:
                continue
            evict(cached)
        elif offline:
            fetched.missing.append(path)
            continue
        todo.append(path)
    if todo:
        from tqdm.auto import tqdm

        total = sum(expected[p].size or 0 for p in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {repo}", disable=not progress,
                  leave=False) as bar:
            for path in todo:
                local = download_file(repo, commit, path, bar=bar)
                record = verify(local, expected[path])
                if record is None:
                    got, size = sha256_of(local)[0], Path(local).stat().st_size
                    evict(local)
                    want = expected[path]
                    said = f"sha256 {want.sha256[:12]}…" if want.sha256 else f"git blob {(want.blob_id or '')[:12]}…"
                    raise AdaptkitError(f"{repo}@{commit[:7]}: {path} arrived as {size} bytes with sha256 "
                                        f"{got[:12]}…, not the {want.size} bytes with {said} expected; "
                                        "removed it from the cache")
                fetched.records[path] = record
                (fetched.repaired if path in fetched.corrupt else fetched.downloaded).append(path)
        fetched.corrupt = [p for p in fetched.corrupt if p not in fetched.repaired]
    return fetched


def download_file(repo: str, commit: str, path: str, *, bar=None) -> str:
    """hf_hub_download of one file at a commit (to a temporary name, renamed when whole); its cache path."""
    from huggingface_hub import hf_hub_download

    return call(lambda: hf_hub_download(repo, path, revision=commit, endpoint=endpoint(),
                                        tqdm_class=forwarding(bar) if bar is not None else None),
                repo=repo, rev=commit, file=path)


def forwarding(outer):
    """A tqdm class for huggingface_hub's per-file bars that only feeds our one bar for the pull."""
    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            outer.update(n)

    return Forward


def verify(local: str | Path, want: Expected) -> FileRecord | None:
    """The file's record when its size and hash are as expected, else None."""
    size = Path(local).stat().st_size
    if want.size is not None and size != want.size:
        return None
    sha256, blob_id = sha256_of(local, git=want.sha256 is None and want.blob_id is not None)
    if want.sha256 is not None and sha256 != want.sha256:
        return None
    if want.sha256 is None and want.blob_id is not None and blob_id != want.blob_id:
        return None
    return FileRecord(size, sha256)


def sha256_of(path: str | Path, *, git: bool = False) -> tuple[str, str | None]:
    """sha256 of the file, and its git blob id (sha1 of 'blob <size>\\0' + content) when asked."""
    sha = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size) if git else None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            if blob is not None:
                blob.update(chunk)
    return sha.hexdigest(), blob.hexdigest() if blob is not None else None


def evict(pointer: str | Path) -> None:
    """Remove a cached file: the snapshot's link and the blob it points at."""
    pointer = Path(pointer)
    blob = Path(os.path.realpath(pointer))
    pointer.unlink(missing_ok=True)
    if blob != pointer:
        blob.unlink(missing_ok=True)
