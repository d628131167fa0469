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
from pathlib import Path, PurePosixPath

from .errors import AdaptkitError

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

    def by_repo(self, repo: str) -> Entry | None:
        """The entry pulled from `repo` (the first, when several names pin it)."""
        return next((e for e in self.entries.values() if e.repo == repo), None)

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
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, self.path)


def _q(text: str) -> str:
    # A JSON string is a TOML basic string (same escapes), but for DEL, which TOML wants escaped.
    return json.dumps(str(text), ensure_ascii=False).replace("\x7f", "\\u007f")


def safe_file_name(path: str) -> bool:
    """A repository file name that stays inside its folder: relative, no '..', no backslashes."""
    if not path or "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return False
    return ".." not in PurePosixPath(path).parts


def read(path: str | Path = LOCK_FILE) -> Lock:
    """The lock at `path` (empty when there is none); a malformed one is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        return Lock(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found = re.search(r"\(at line (\d+), column \d+\)", str(e))
        what = re.sub(r"\s*\(at line.*?\)", "", str(e)).rstrip(".")
        where = f" line {found.group(1)}" if found else ""
        raise AdaptkitError(f"{path}{where}: not valid TOML ({what[:1].lower() + what[1:]})") from None
    if data.get("version", VERSION) != VERSION:
        raise AdaptkitError(f"{path} line {_line(text, 'version')}: version {data['version']!r} is not one this "
                            f"adaptkit reads (it reads {VERSION})")
    unknown = sorted(set(data) - {"version", "adapters"})
    if unknown:
        raise AdaptkitError(f"{path} line {_line(text, unknown[0])}: unknown key '{unknown[0]}' "
                            "(expected 'version' and [adapters.NAME] tables)")
    adapters = data.get("adapters", {})
    if not isinstance(adapters, dict):
        raise AdaptkitError(f"{path} line {_line(text, 'adapters')}: 'adapters' must be tables [adapters.NAME]")
    lock = Lock(path)
    for name, raw in adapters.items():
        lock.entries[name] = _entry(path, text, name, raw)
    return lock


def _entry(path: Path, text: str, name: str, raw) -> Entry:
    line = _table_line(text, name)

    def bad(message: str) -> AdaptkitError:
        return AdaptkitError(f"{path} line {line}: adapter '{name}': {message}")

    if not NAME.match(name):
        raise bad("a name is letters, digits, '.', '_' and '-' (no '/', so it never reads as org/name)")
    if not isinstance(raw, dict):
        raise bad("must be a table")
    for key in ("repo", "commit"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise bad(f"'{key}' is missing")
    if not COMMIT.match(raw["commit"]):
        raise bad(f"commit '{raw['commit']}' is not 40 hex digits")
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("no [files] with their size and sha256")
    records = {}
    for file, record in files.items():
        if not safe_file_name(file):
            raise bad(f"file name '{file}' leaves the repository folder; refused")
        if not (isinstance(record, dict) and isinstance(record.get("size"), int)
                and isinstance(record.get("sha256"), str) and SHA256.match(record["sha256"])):
            raise bad(f"file '{file}' needs {{ size = <bytes>, sha256 = \"<64 hex digits>\" }}")
        records[file] = FileRecord(record["size"], record["sha256"])
    return Entry(name=name, repo=raw["repo"], revision=str(raw.get("revision") or raw["commit"]),
                 commit=raw["commit"], files=records, variant=raw.get("variant"), base_model=raw.get("base_model"))


def _line(text: str, key: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return 1


def _table_line(text: str, name: str) -> int:
    """The line of `[adapters.NAME]` (quoted or bare), else of the first line naming it."""
    quoted = re.escape(name)
    pattern = re.compile(rf"^\s*\[\s*adapters\s*\.\s*(\"{quoted}\"|'{quoted}'|{quoted})\s*\]")
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if pattern.match(line):
            return number
    return next((n for n, line in enumerate(lines, 1) if name in line), 1)
