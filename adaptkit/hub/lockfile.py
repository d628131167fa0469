"""`adaptkit.lock`: Hub adapters pinned by name to a repository commit, with each file's size and sha256.

TOML, read with tomllib and written by the few lines below (no TOML writer dependency):

    version = 1

    [adapters."tiny-lora"]
    repo = "org/tiny-lora"
    revision = "main"          # what was asked for: a branch, a tag or a commit
    commit = "0123...abcd"     # what it resolved to (40 hex digits)
    variant = "<variant plugin>"
    base_model = "org/tiny-llama"

    [adapters."tiny-lora".files]
    "adapter_config.json" = { size = 512, sha256 = "..." }

An entry is pinned when its revision is itself a commit: `adaptkit hub sync --update` leaves it alone.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdaptkitError
from .client import quoted, repo_problem, revision_problem

LOCK_FILE = "adaptkit.lock"
VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
HEADER = ("# adaptkit.lock: Hub adapters pinned to a commit, with their files' sha256.\n"
          "# Written by `adaptkit hub pull` and `adaptkit hub sync --update`; commit it with your recipes.\n")


@dataclass
class FileRecord:
    size: int
    sha256: str


@dataclass
class Entry:
    """One pinned adapter: `name` resolves to `repo` at `commit`."""

    name: str
    repo: str
    revision: str
    commit: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    variant: str | None = None
    base_model: str | None = None

    @property
    def pinned(self) -> bool:
        """Asked for by commit: `sync --update` never moves it."""
        return self.revision == self.commit or bool(COMMIT.match(self.revision))


@dataclass
class Lock:
    """The entries of one lock file, by name."""

    path: Path
    entries: dict[str, Entry] = field(default_factory=dict)

    def by_repo(self, repo: str, commit: str | None = None) -> Entry | None:
        """The entry pulled from `repo` (at `commit`, if given; the first, when several names pin it)."""
        return next((e for e in self.entries.values() if e.repo == repo and commit in (None, e.commit)), None)

    def write(self) -> None:
        """Write atomically (a temporary file renamed over the old one)."""
        lines = [HEADER, f"version = {VERSION}\n"]
        for name in sorted(self.entries):
            e = self.entries[name]
            lines.append(f"\n[adapters.{_q(name)}]\n")
            lines += [f"{key} = {_q(value)}\n" for key, value in (("repo", e.repo), ("revision", e.revision),
                      ("commit", e.commit), ("variant", e.variant), ("base_model", e.base_model)) if value]
            lines.append(f"\n[adapters.{_q(name)}.files]\n")
            lines += [f"{_q(path)} = {{ size = {r.size}, sha256 = {_q(r.sha256)} }}\n"
                      for path, r in sorted(e.files.items())]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(lines), encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # left only when writing or renaming failed


def _q(text: str) -> str:
    # A JSON string is a TOML basic string (same escapes), but for DEL, which TOML wants escaped.
    return json.dumps(str(text), ensure_ascii=False).replace("\x7f", "\\u007f")


def safe_file_name(path) -> bool:
    """A repository file name that stays inside its folder: a relative '/'-separated path whose parts are
    plain names (none empty, '.' or '..'), with no backslash, drive letter or control character."""
    if not isinstance(path, str) or not path.isprintable() or "\\" in path or re.match(r"^[A-Za-z]:", path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def read(path: str | Path = LOCK_FILE) -> Lock:
    """The lock at `path` (empty when there is none); a malformed one is an error naming its line."""
    path = Path(path)
    if not path.exists():
        return Lock(path)
    if not path.is_file():
        raise AdaptkitError(f"{path}: a lock file is a file, not a {'folder' if path.is_dir() else 'special file'}")
    data, text = _parse(path)
    if "version" in data and (type(data["version"]) is not int or data["version"] != VERSION):
        raise AdaptkitError(f"{path} line {_line(text, 'version')}: version {quoted(data['version'], 20)} is not one "
                            f"this adaptkit reads (it reads {VERSION})")
    unknown = sorted(set(data) - {"version", "adapters"})
    if unknown:
        raise AdaptkitError(f"{path} line {_line(text, unknown[0])}: unknown key {quoted(unknown[0])} "
                            "(expected 'version' and [adapters.NAME] tables)")
    adapters = data.get("adapters", {})
    if not isinstance(adapters, dict):
        raise AdaptkitError(f"{path} line {_line(text, 'adapters')}: 'adapters' must be tables [adapters.NAME]")
    lock = Lock(path)
    for name, raw in adapters.items():
        lock.entries[name] = _entry(path, text, name, raw)
    return lock


def _parse(path: Path) -> tuple[dict, str]:
    """The lock's TOML and its text; bytes that are not UTF-8, TOML errors and nesting too deep to read
    are errors naming the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise AdaptkitError(f"{path} line {line}: not UTF-8 text (byte {e.start}); a lock file is TOML") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        what = re.sub(r"\s*\(at line.*?\)", "", str(e)).rstrip(".")
        where = f" line {found.group(1)}" if found else ""
        raise AdaptkitError(f"{path}{where}: not valid TOML ({what[:1].lower() + what[1:]})") from None
    except RecursionError:
        raise AdaptkitError(f"{path}: nested too deeply to read; a lock file is flat tables") from None


ENTRY_KEYS = ("repo", "revision", "commit", "variant", "base_model", "files")


def _entry(path: Path, text: str, name: str, raw) -> Entry:
    line = _table_line(text, name)

    def bad(message: str, key: str | None = None) -> AdaptkitError:
        where = _line(text, key, line) if key else line
        return AdaptkitError(f"{path} line {where}: adapter {quoted(name)}: {message}")

    if not NAME.match(name):
        raise bad("a name is letters, digits, '.', '_' and '-' (no '/', so it never reads as org/name)")
    if not isinstance(raw, dict):
        raise bad("must be a table")
    unknown = [k for k in raw if k not in ENTRY_KEYS]
    if unknown:
        raise bad(f"unknown key {quoted(unknown[0])} (expected {', '.join(ENTRY_KEYS)})", unknown[0])
    for key in ("repo", "commit"):
        if key not in raw:
            raise bad(f"'{key}' is missing")
    problem = repo_problem(raw["repo"])
    if problem:
        raise bad(f"repo {quoted(raw['repo'])} is not a Hub repository id ({problem})", "repo")
    if not (isinstance(raw["commit"], str) and COMMIT.match(raw["commit"])):
        raise bad(f"commit {quoted(raw['commit'])} is not 40 hex digits", "commit")
    revision = raw.get("revision", raw["commit"])
    problem = revision_problem(revision)
    if problem:
        raise bad(f"revision {quoted(revision)} is not a branch, tag or commit ({problem})", "revision")
    for key in ("variant", "base_model"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(f"'{key}' must be a string, not {type(raw[key]).__name__}", key)
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("no [files] with their size and sha256", "files" if "files" in raw else None)
    records = {}
    for file, record in files.items():
        records[file] = _file_record(file, record, bad)
    return Entry(name=name, repo=raw["repo"], revision=revision, commit=raw["commit"], files=records,
                 variant=raw.get("variant"), base_model=raw.get("base_model"))


def _file_record(file: str, record, bad) -> FileRecord:
    """One file of an entry: a name that stays inside the repository folder, `{ size, sha256 }`."""
    if not safe_file_name(file):
        raise bad(f"file name {quoted(file)} leaves the repository folder (or is no plain relative path); refused")
    need = f"file {quoted(file)} needs {{ size = <bytes>, sha256 = \"<64 hex digits>\" }}"
    if not isinstance(record, dict):
        raise bad(f"{need}, not {type(record).__name__}")
    unknown = [k for k in record if k not in ("size", "sha256")]
    if unknown:
        raise bad(f"{need}; unknown key {quoted(unknown[0])}")
    size, sha256 = record.get("size"), record.get("sha256")
    if type(size) is not int or size < 0:
        raise bad(f"{need}; size {quoted(size, 30)} is not a byte count")
    if not (isinstance(sha256, str) and SHA256.match(sha256)):
        raise bad(f"{need}; sha256 {quoted(sha256, 30)} is not 64 hex digits")
    return FileRecord(size, sha256)


def _line(text: str, key: str, start: int = 1) -> int:
    """The line (from `start` on) that sets `key`, bare or quoted; else `start`."""
    pattern = re.compile(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=")
    return next((n for n, line in enumerate(text.splitlines()[start - 1:], start) if pattern.match(line)), start)


def _table_line(text: str, name: str) -> int:
    """The line of `[adapters.NAME]` (quoted or bare), else of the first line naming it."""
    quoted = re.escape(name)
    pattern = re.compile(rf"^\s*\[\s*adapters\s*\.\s*(\"{quoted}\"|'{quoted}'|{quoted})\s*\]")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if pattern.match(line):
            return number
    return next((n for n, line in enumerate(lines, 1) if name in line), 1)
