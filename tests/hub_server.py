"""A Hugging Face Hub stand-in on 127.0.0.1 for the tests: the REST routes huggingface_hub uses, serving
repositories made from real folders, with faults on demand (HTTP errors, cut or corrupted downloads).

Routes: GET /api/models (filter, search, author, sort, limit; pages chained by Link headers),
GET /api/models/{repo}[/revision/{rev}], GET /api/models/{repo}/tree/{rev}[/{path}],
HEAD/GET /{repo}/resolve/{rev}/{path} (X-Repo-Commit, quoted ETag, Content-Length, Range),
POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/preupload/{rev} (always "regular":
files come inline, base64) and /api/models/{repo}/commit/{rev}. Missing things are 404s with
X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), as on the Hub. Any token is accepted.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SORTS = ("downloads", "likes", "lastModified")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    date: dt.datetime


@dataclass
class Repo:
    id: str
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0
    private: bool = False
    card: dict | None = None
    extra_tree: list[dict] = field(default_factory=list)  # listed, never served (e.g. '../' names)
    hidden: set[str] = field(default_factory=set)  # listed, but 404 when fetched
    info_override: dict = field(default_factory=dict)  # fields of /api/models answers replaced (e.g. a crafted sha)

    def commit(self, rev: str) -> Commit | None:
        sha = self.refs.get(rev, rev)
        return next((c for c in self.commits if c.sha == sha), None)


@dataclass
class Fault:
    pattern: re.Pattern
    kind: str  # "status", "cut", "corrupt"
    times: int
    status: int = 500
    after: int = 0


class FakeHub:
    """`hub = FakeHub().start()`; `hub.url` goes into HF_ENDPOINT; `hub.stop()` at the end."""

    def __init__(self, page_size: int = 2):
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, dict]] = []  # (method, path?query, headers)
        self.lock = threading.Lock()
        self._counter = 0
        self._clock = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

    # -- repositories

    def add(self, repo_id: str, files: Path | dict[str, bytes], *, tags=(), downloads=0, likes=0, card=None,
            updated: dt.datetime | None = None) -> str:
        """A repository whose main branch holds `files` (a folder's files, or name -> bytes)."""
        self.repos[repo_id] = Repo(repo_id, tags=list(tags), downloads=downloads, likes=likes, card=card)
        return self.commit(repo_id, files, date=updated)

    def commit(self, repo_id: str, files: Path | dict[str, bytes], *, remove=(), branch: str = "main",
               date: dt.datetime | None = None) -> str:
        """A new commit on `branch`: the previous files, updated by `files`, minus `remove`."""
        repo = self.repos[repo_id]
        if isinstance(files, Path):
            files = {str(p.relative_to(files)).replace("\\", "/"): p.read_bytes()
                     for p in sorted(files.rglob("*")) if p.is_file()}
        parent = repo.commit(branch)
        content = dict(parent.files) if parent else {}
        content.update(files)
        for path in remove:
            content.pop(path, None)
        with self.lock:
            self._counter += 1
            self._clock += dt.timedelta(hours=1)
            stamp = date or self._clock
            seed = json.dumps([repo_id, self._counter, sorted((k, git_blob_id(v)) for k, v in content.items())])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits.append(Commit(sha, content, stamp))
        repo.refs[branch] = sha
        return sha

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].refs[name] = sha

    # -- faults and the request log

    def fail(self, pattern: str, status: int = 500, times: int = 1) -> None:
        """Answer `status` to the next `times` requests whose path matches `pattern`."""
        self.faults.append(Fault(re.compile(pattern), "status", times, status=status))

    def cut(self, pattern: str, after: int = 64, times: int = 1) -> None:
        """Close the connection `after` bytes into the next `times` matching downloads."""
        self.faults.append(Fault(re.compile(pattern), "cut", times, after=after))

    def corrupt(self, pattern: str, times: int = 1) -> None:
        """Serve flipped bytes (right length) for the next `times` matching downloads."""
        self.faults.append(Fault(re.compile(pattern), "corrupt", times))

    def take_fault(self, path: str, kinds: tuple[str, ...]) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.kind in kinds and fault.times > 0 and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None

    def count(self, method: str, pattern: str = "") -> int:
        return sum(1 for m, p, _ in self.log if m == method and re.search(pattern, p))

    def downloads_done(self) -> int:
        """GET requests for file contents (HEADs and API calls excluded)."""
        return self.count("GET", r"/resolve/")

    # -- server

    def start(self) -> FakeHub:
        hub = self

        class Handler(HubHandler):
            server_hub = hub

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client gone mid-answer (cut downloads): not news
        pass


def refused_url() -> str:
    """An address where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: FakeHub

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._send(status, json.dumps({"error": message}).encode(), extra, head=self.command == "HEAD")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        with hub.lock:
            hub.log.append((self.command, path + (f"?{url.query}" if url.query else ""), dict(self.headers)))
        fault = hub.take_fault(path, ("status",))
        if fault is not None:
            if self.command == "POST":
                self._body()
            return self._error(fault.status, None, f"injected {fault.status}")
        query = parse_qs(url.query)
        routes = [
            ("GET", r"^/api/models$", self._list),
            ("GET", r"^/api/agent-harnesses$", lambda query: self._json(200, {"standardEnvVars": [], "harnesses": {}})),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>.+))?$", self._info),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<sub>.*))?$", self._tree),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)$", self._preupload),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)$", self._commit),
            ("POST", r"^/api/repos/create$", self._create),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("HEAD", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
            ("GET", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
        ]
        # Revisions come URL-quoted as one segment (`refs%2Fpr%2F1`): match on the raw path, unquote after.
        raw = url.path
        for method, pattern, handler in routes:
            m = re.match(pattern, raw)
            if method == self.command and m:
                args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                return handler(query=query, **args)
        self._error(404, None, f"no route {self.command} {path}")

    do_GET = do_HEAD = do_POST = _dispatch

    # -- routes

    def _repo(self, repo_id: str, rev: str | None = None) -> tuple[Repo | None, Commit | None]:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None, None
        commit = repo.commit(rev or "main")
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return repo, None
        return repo, commit

    def _model(self, repo: Repo, commit: Commit, blobs: bool = False) -> dict:
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=len(data), blobId=git_blob_id(data))
                if path.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        config = json.loads(commit.files["config.json"]) if "config.json" in commit.files else None
        owner = repo.id.split("/")[0]
        return {"_id": repo.id, "id": repo.id, "modelId": repo.id, "author": owner, "sha": commit.sha,
                "lastModified": repo.commits[-1].date.isoformat().replace("+00:00", ".000Z"),
                "createdAt": repo.commits[0].date.isoformat().replace("+00:00", ".000Z"),
                "private": repo.private, "gated": False, "disabled": False, "downloads": repo.downloads,
                "likes": repo.likes, "tags": repo.tags, "cardData": repo.card,
                "library_name": "peft" if "peft" in repo.tags else None,
                "config": {k: config[k] for k in ("architectures", "model_type") if k in config} if config else None,
                "siblings": siblings}

    def _list(self, query):
        hub = self.server_hub
        filters = [f.lower() for f in query.get("filter", [])]
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        sort = (query.get("sort") or [None])[0]
        limit = int((query.get("limit") or [hub.page_size])[0])
        cursor = int((query.get("cursor") or ["0"])[0])
        rows = []
        for repo in hub.repos.values():
            lower = [t.lower() for t in repo.tags]
            if repo.private or not all(f in lower for f in filters) or search not in repo.id.lower():
                continue
            if author and repo.id.split("/")[0] != author:
                continue
            rows.append(self._model(repo, repo.commits[-1]))
        if sort in SORTS:  # always descending, as on the Hub
            rows.sort(key=lambda r: r[sort], reverse=True)
        size = min(limit, hub.page_size)
        page = rows[cursor:cursor + size]
        headers = {}
        if cursor + size < len(rows):
            rest = {k: v for k, v in query.items() if k != "cursor"}
            rest["cursor"] = [str(cursor + size)]
            headers["Link"] = f'<{hub.url}/api/models?{urlencode(rest, doseq=True)}>; rel="next"'
        for row in page:
            row.pop("siblings")
            row.pop("config")
        self._json(200, page, headers)

    def _info(self, query, repo, rev):
        found, commit = self._repo(repo, rev)
        if commit is not None:
            self._json(200, {**self._model(found, commit, blobs=query.get("blobs") == ["True"]), **found.info_override})

    def _tree(self, query, repo, rev, sub):
        found, commit = self._repo(repo, rev)
        if commit is None:
            return
        recursive = (query.get("recursive") or ["False"])[0].lower() == "true"
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                if not recursive:
                    continue
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(200, entries + found.extra_tree)

    def _resolve(self, query, repo, rev, file):
        found, commit = self._repo(repo, rev)
        if commit is None:
            return
        if file not in commit.files or file in found.hidden:
            return self._error(404, "EntryNotFound", f"{file} does not exist on \"{rev}\"",
                               {"X-Repo-Commit": commit.sha})
        data = commit.files[file]
        etag = hashlib.sha256(data).hexdigest() if file.endswith(LFS_SUFFIXES) else git_blob_id(data)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if self.command == "HEAD":
            return self._send(200, data, headers, head=True)
        start, status = 0, 200
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        path = f"/{repo}/resolve/{rev}/{file}"
        fault = self.server_hub.take_fault(path, ("cut", "corrupt"))
        if fault is not None and fault.kind == "corrupt":
            data = bytes(b ^ 0xFF for b in data)
        if fault is not None and fault.kind == "cut":
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[:fault.after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, data, headers)

    def _create(self, query):
        hub = self.server_hub
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{hub.url}/{repo_id}"
        if repo_id in hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        hub.add(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        hub.repos[repo_id].private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, query):
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, query, repo, rev):
        payload = json.loads(self._body())
        found, commit = self._repo(repo, rev)
        if commit is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload["files"]]
        self._json(200, {"files": files, "commitOid": commit.sha})

    def _commit(self, query, repo, rev):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        found, commit = self._repo(repo, rev)
        if commit is None:
            return
        added, removed = {}, []
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                removed.append(value["path"])
            elif item["key"] != "header":
                return self._error(400, None, f"this test Hub takes inline files only, not {item['key']}")
        sha = self.server_hub.commit(repo, added, remove=removed, branch=rev)
        self._json(200, {"commitUrl": f"{self.server_hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None})


def online(monkeypatch, url: str, folder) -> None:
    """Point huggingface_hub (and adaptkit's Hub client) at the test server `url`, with its cache,
    token file and adaptkit.lock in `folder`, fast retries, and HF_HUB_OFFLINE unset."""
    from adaptkit.hub import client as hub_client

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(folder / "hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(folder / "no-token"))
    monkeypatch.setattr(hub_client, "BACKOFF", 0.001)
    monkeypatch.chdir(folder)  # adaptkit.lock lives in the working folder
