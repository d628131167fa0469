"""The Hub layer against hostile input and faults: an unreachable Hub, invalid repository ids and
revisions, malformed lock entries, and a server whose tree listing or commit would lead paths out of
the download folder. Each ends in one line with exit 1, in seconds, and leaves nothing behind."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from safetensors.torch import save

from adaptkit.hub import repos as hub
from adaptkit.hub import client as hub_client
from adaptkit.hub import lockfile
from adaptkit.errors import AdaptkitError
from hostile import assert_one_line_error, run_cli, run_process
from hub_server import FakeHub, online, refused_url

REPO = "org/tiny-lora"
COMMIT = "c" * 40
BOUND_S = 15  # a bound on "fails in seconds", not a benchmark: huggingface_hub's retries took 23-110 s


def adapter_files() -> dict[str, bytes]:
    """A tiny LoRA (one module), made by hand: config and weights."""
    import torch

    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "org/tiny-llama"}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.zeros(2, 8), f"{prefix}.lora_B.weight": torch.zeros(8, 2)}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


def cache_snapshot(cache: Path, files: dict[str, bytes], commit: str = COMMIT, ref: str | None = None) -> None:
    """`files` as REPO's snapshot at `commit` in an HF cache (and `refs/<ref>` pointing at it)."""
    folder = cache / f"models--{REPO.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        (folder / "snapshots" / commit / name).write_bytes(data)
    if ref:
        (folder / "refs").mkdir()
        (folder / "refs" / ref).write_text(commit)


def write_lock(folder: Path, files: dict[str, bytes], commit: str = COMMIT) -> None:
    """adaptkit.lock in `folder` pinning REPO at `commit` as 'tiny', with `files`' sizes and hashes."""
    records = {n: lockfile.FileRecord(len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()}
    entry = lockfile.Entry(name="tiny", repo=REPO, revision="main", commit=commit, files=records)
    lockfile.Lock(folder / lockfile.LOCK_FILE, {"tiny": entry}).write()


# -- the Hub unreachable, HF_HUB_OFFLINE unset: (id, set-up, command, fragment) ------------------------
# Each runs as its own process, as a user would: huggingface_hub logs retries to the real stderr, and
# reads HF_ENDPOINT and HF_HUB_OFFLINE at import.

def nothing(d: Path) -> None:
    pass


def lock_not_cached(d: Path) -> None:
    write_lock(d, adapter_files())


def lock_half_cached(d: Path) -> None:
    files = adapter_files()
    write_lock(d, files)
    cache_snapshot(d / "hf-cache", {"adapter_config.json": files["adapter_config.json"]})


UNREACHABLE = [
    ("hub search", nothing, ["hub", "search"], "cannot reach the Hub at {url} for search (connection refused)"),
    ("hub pull", nothing, ["hub", "pull", REPO],
     f"cannot reach the Hub at {{url}} for {REPO}@main (connection refused)"),
    ("hub sync", lock_not_cached, ["hub", "sync"], "(connection refused); check HF_ENDPOINT and the connection, or run "
                                                   "`adaptkit hub sync --offline`"),
    ("inspect org/name", nothing, ["inspect", REPO],
     f"{REPO}: not a local path, and the Hub cannot be reached at {{url}} (connection refused)"),
    ("inspect org/name@commit", nothing, ["inspect", f"{REPO}@{COMMIT}"],
     "not a local path, and the Hub cannot be reached at {url} (connection refused); the cache does not hold it"),
    ("inspect lock name", lock_not_cached, ["inspect", "tiny"],
     f"tiny (adaptkit.lock: {REPO}@ccccccc): not all of it is in the cache, and the Hub cannot be reached at {{url}} "
     "(connection refused)"),
    ("inspect lock name, half cached", lock_half_cached, ["inspect", "tiny"], "not all of it is in the cache"),
    ("merge -m org/name", nothing, ["merge", "-m", REPO, "-m", "org/other", "-o", "out"],
     f"{REPO}: not a local path, and the Hub cannot be reached at {{url}}"),
]


def hub_env(d: Path) -> dict[str, str]:
    """The Hub at a port where nothing listens, offline mode off, an empty cache of this test's own."""
    return {"HF_ENDPOINT": refused_url(), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_HOME": str(d / "hf-home"), "HF_HUB_CACHE": str(d / "hf-cache")}


@pytest.mark.parametrize("setup,args,fragment", [r[1:] for r in UNREACHABLE], ids=[r[0] for r in UNREACHABLE])
def test_an_unreachable_hub_fails_in_seconds_with_one_line(tmp_path, monkeypatch, setup, args, fragment):
    monkeypatch.chdir(tmp_path)  # adaptkit.lock is read from the working folder
    setup(tmp_path)
    env = hub_env(tmp_path)
    start = time.monotonic()
    proc = run_process(*args, env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert_one_line_error(proc, fragment.format(url=env["HF_ENDPOINT"]))
    assert elapsed < BOUND_S, f"{elapsed:.0f} s"
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# -- the Hub unreachable, but what is asked for is pinned and in the cache: it works -------------------

def lock_cached(d: Path) -> None:
    files = adapter_files()
    write_lock(d, files)
    cache_snapshot(d / "hf-cache", files)


CACHED = [
    ("lock name", lock_cached, "tiny"),
    ("org/name pinned in the lock", lock_cached, REPO),
    ("org/name@commit pinned in the lock", lock_cached, f"{REPO}@{COMMIT}"),
    ("org/name@commit in the cache", lambda d: cache_snapshot(d / "hf-cache", adapter_files()), f"{REPO}@{COMMIT}"),
    ("org/name with refs/main in the cache", lambda d: cache_snapshot(d / "hf-cache", adapter_files(), ref="main"),
     REPO),
]


@pytest.mark.parametrize("setup,ref", [r[1:] for r in CACHED], ids=[r[0] for r in CACHED])
def test_pinned_and_cached_works_with_the_hub_unreachable(tmp_path, monkeypatch, setup, ref):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    start = time.monotonic()
    proc = run_process("inspect", ref, "--json", env=hub_env(tmp_path), timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "adapter" and not proc.stderr.strip()
    assert elapsed < BOUND_S, f"{elapsed:.0f} s"


# The same in this process (quicker, for the other commands that take a Hub reference): HF_ENDPOINT
# and HF_HUB_OFFLINE are read at call time.
UNREACHABLE_HERE = [
    ("convert org/name", nothing, ["convert", REPO, "--to", "peft", "-o", "out"],
     f"{REPO}: not a local path, and the Hub cannot be reached at {{url}} (connection refused)"),
    ("merge --base org/name", nothing, ["merge", "--base", "org/tiny-llama", "-m", "a", "-o", "out"],
     "org/tiny-llama: not a local path, and the Hub cannot be reached at {url} (connection refused)"),
    ("merge -m lock name", lock_not_cached, ["merge", "-m", "tiny", "-m", "org/other", "-o", "out"],
     f"tiny (adaptkit.lock: {REPO}@ccccccc): not all of it is in the cache, and the Hub cannot be reached at {{url}}"),
    ("train --base org/name", nothing, ["train", "--base", "org/tiny-llama", "--variant", "lora", "--data",
                                        "data.jsonl", "-o", "out"],
     "org/tiny-llama: not a local path, and the Hub cannot be reached at {url} (connection refused)"),
]


@pytest.fixture
def refused_hub(tmp_path, monkeypatch):
    """HF_ENDPOINT at a port where nothing listens, offline mode off, an empty cache; returns the endpoint."""
    url = refused_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    return url


@pytest.mark.parametrize("setup,args,fragment", [r[1:] for r in UNREACHABLE_HERE], ids=[r[0] for r in UNREACHABLE_HERE])
def test_other_hub_references_fail_in_seconds_too(refused_hub, tmp_path, setup, args, fragment):
    setup(tmp_path)
    start = time.monotonic()
    assert_one_line_error(run_cli(*args), fragment.format(url=refused_hub))
    assert time.monotonic() - start < BOUND_S
    assert not (tmp_path / "out").exists()


def test_load_adapter_from_an_unreachable_hub_is_one_error(refused_hub):
    from builders import tiny_llama

    import adaptkit as ak

    start = time.monotonic()
    with pytest.raises(AdaptkitError, match=f"{REPO}: not a local path, and the Hub cannot be reached at http"):
        ak.load_adapter(tiny_llama(), REPO)
    assert time.monotonic() - start < BOUND_S


def test_the_client_log_level_and_retry_policy_are_put_back():
    """`hub_session` changes huggingface_hub's log level and connect-retry default only while it runs."""
    from huggingface_hub.utils import http_backoff, logging

    level, policy = logging.get_verbosity(), http_backoff.__kwdefaults__["retry_on_exceptions"]
    with hub_client.hub_session():
        with hub_client.hub_session():  # sessions nest (a download inside a resolve)
            pass
        assert logging.get_verbosity() == logging.ERROR
        retried = http_backoff.__kwdefaults__["retry_on_exceptions"]
        assert retried and not any(c.__name__ in hub_client.NO_CONNECTION for c in retried)
        assert "ReadTimeout" in {c.__name__ for c in retried}  # a connection that broke off is still retried
    assert logging.get_verbosity() == level and http_backoff.__kwdefaults__["retry_on_exceptions"] == policy


# -- repository ids and revisions huggingface_hub would refuse: (id, command, fragment) ----------------
LONG = "org/" + "a" * 200
BAD_IDS = [
    ("'..' in the id", ["hub", "pull", "a..b/c"],
     "a..b/c: not a Hub reference (org/name[@revision]): cannot have -- or .."),
    ("'--' in the id", ["hub", "pull", "org/a--b"], "org/a--b: not a Hub reference"),
    ("name starts with '-'", ["hub", "pull", "org/-x"], "The name cannot start or end with '-' or '.'"),
    ("ends with .git", ["hub", "pull", "org/x.git"], "repo_id cannot end by '.git'"),
    ("non-ASCII", ["hub", "pull", "org/naïve"], "repo id must use alphanumeric chars"),
    ("too long", ["hub", "pull", LONG], f"{repr(LONG)[:60]}…: not a Hub reference"),
    ("revision with '..'", ["hub", "pull", "org/x@../../etc"], "a revision has no '.' or '..' parts"),
    ("revision with '.'", ["hub", "pull", "org/x@a/./b"], "a revision has no '.' or '..' parts"),
    ("not org/name", ["hub", "pull", "just-a-name"],
     "just-a-name: not a Hub reference (org/name[@revision]): no 'org/' before the name"),
    ("three parts", ["hub", "pull", "a/b/c"], "a/b/c: not a Hub reference (org/name[@revision]): it holds characters"),
    ("push to '..'", ["hub", "push", ".", "a..b/c"], "a..b/c: not a repository id (org/name): cannot have -- or .."),
    ("push to org/name@rev", ["hub", "push", ".", "org/x@v1"], "org/x@v1: not a repository id (org/name)"),
    ("inspect a path like ../x/y", ["inspect", "../nope/y"], "../nope/y"),
    ("merge -m a path like ../x/y", ["merge", "-m", "../nope/y", "-m", "../nope/z", "-o", "out"], "../nope/y"),
]


@pytest.mark.parametrize("args,fragment", [r[1:] for r in BAD_IDS], ids=[r[0] for r in BAD_IDS])
def test_invalid_repo_ids_and_revisions_are_one_line(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", refused_url())  # never asked: the id is refused first
    line = assert_one_line_error(run_cli(*args), fragment)
    assert "cannot reach" not in line and "HF_HUB_OFFLINE" not in line
    assert not list(tmp_path.iterdir())


def test_resolve_refuses_what_huggingface_hub_would_refuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ("a..b/c", "org/x@../y", "../nope/y"):
        with pytest.raises(AdaptkitError, match="no such file or folder, and not a Hub reference"):
            hub.resolve(ref)
        assert not hub.is_reference(ref)


# -- malformed lock entries: (id, lock text, fragment) ------------------------------------------------
SHA = "b" * 64


def lock_text(*, repo='"org/tiny-lora"', commit=f'"{COMMIT}"', extra="", file='"adapter_config.json"',
              record=f'{{ size = 12, sha256 = "{SHA}" }}') -> str:
    """A lock whose one entry (line 3) has repo on line 4, commit on line 5, `extra` on line 6, its file on line 8."""
    return (f'version = 1\n\n[adapters.tiny]\nrepo = {repo}\ncommit = {commit}\n{extra}\n'
            f'[adapters.tiny.files]\n{file} = {record}\n')


BAD_LOCKS = [
    ("repo id with '..'", lock_text(repo='"a..b/c"'),
     "adaptkit.lock line 4: adapter 'tiny': repo 'a..b/c' is not a Hub repository id (cannot have -- or .."),
    ("repo id without org", lock_text(repo='"tiny"'), "line 4: adapter 'tiny': repo 'tiny' is not a Hub repository id "
                                                      "(a repository id is org/name)"),
    ("repo id a number", lock_text(repo="5"),
     "repo 5 is not a Hub repository id (a repository id is a string, not int)"),
    ("repo id too long", lock_text(repo=f'"org/{"x" * 300}"'), "line 4: adapter 'tiny': repo 'org/xxxxxxxx"),
    ("commit not hex", lock_text(commit='"main"'), "line 5: adapter 'tiny': commit 'main' is not 40 hex digits"),
    ("commit a number", lock_text(commit="12"), "line 5: adapter 'tiny': commit 12 is not 40 hex digits"),
    ("revision with '..'", lock_text(extra='revision = "../../x"'),
     "line 6: adapter 'tiny': revision '../../x' is not a branch, tag or commit (a revision has no '.' or '..' parts)"),
    ("revision a number", lock_text(extra="revision = 3"), "revision 3 is not a branch, tag or commit"),
    ("variant a table", lock_text(extra="variant = { a = 1 }"), "line 6: adapter 'tiny': 'variant' must be a string"),
    ("unknown entry key", lock_text(extra="url = 'http://x'"), "line 6: adapter 'tiny': unknown key 'url'"),
    ("file name ../", lock_text(file='"../../x.json"'), "line 3: adapter 'tiny': file name '../../x.json' leaves"),
    ("file name absolute", lock_text(file='"/etc/passwd"'), "file name '/etc/passwd' leaves the repository folder"),
    ("file name backslash", lock_text(file='"a\\\\..\\\\x"'), "leaves the repository folder"),
    ("file name drive", lock_text(file='"C:x.json"'), "file name 'C:x.json' leaves"),
    ("file name empty part", lock_text(file='"a//b.json"'), "file name 'a//b.json' leaves"),
    ("file name control char", lock_text(file='"a\\nb"'), "file name 'a\\nb' leaves"),
    ("record not a table", lock_text(record="5"), "file 'adapter_config.json' needs { size = <bytes>, sha256 = "
                                                  "\"<64 hex digits>\" }, not int"),
    ("size a string", lock_text(record=f'{{ size = "12", sha256 = "{SHA}" }}'), "size '12' is not a byte count"),
    ("size negative", lock_text(record=f'{{ size = -1, sha256 = "{SHA}" }}'), "size -1 is not a byte count"),
    ("size a bool", lock_text(record=f'{{ size = true, sha256 = "{SHA}" }}'), "size True is not a byte count"),
    ("size a float", lock_text(record=f'{{ size = 1.5, sha256 = "{SHA}" }}'), "size 1.5 is not a byte count"),
    ("sha256 short", lock_text(record='{ size = 1, sha256 = "abc" }'), "sha256 'abc' is not 64 hex digits"),
    ("sha256 missing", lock_text(record="{ size = 1 }"), "sha256 None is not 64 hex digits"),
    ("record with extra key", lock_text(record=f'{{ size = 1, sha256 = "{SHA}", url = "x" }}'), "unknown key 'url'"),
    ("version a bool", "version = true\n", "adaptkit.lock line 1: version True is not one this adaptkit reads"),
    ("version a string", 'version = "1"\n', "adaptkit.lock line 1: version '1' is not one"),
    ("not TOML", 'version = 1\n[adapters.tiny\n', "adaptkit.lock line 2: not valid TOML"),
    ("nested too deep", "x = " + "[" * 50000 + "]" * 50000 + "\n", "adaptkit.lock: nested too deeply to read"),
    ("not UTF-8", b'version = 1\n# caf\xe9\n', "adaptkit.lock line 2: not UTF-8 text"),
]


@pytest.mark.parametrize("text,fragment", [r[1:] for r in BAD_LOCKS], ids=[r[0] for r in BAD_LOCKS])
def test_malformed_lock_entries_are_one_line(tmp_path, monkeypatch, text, fragment):
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / lockfile.LOCK_FILE
    lock.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(run_cli("hub", "sync", "--offline"), fragment)
    assert_one_line_error(run_cli("inspect", "tiny"), fragment)  # a lock name goes through the same reading
    assert sorted(p.name for p in tmp_path.iterdir()) == [lockfile.LOCK_FILE]


def test_the_good_lock_text_is_read():
    """The rows above each break one thing in a lock that is otherwise read as it is."""
    import tomllib

    entry = lockfile._entry(Path("adaptkit.lock"), lock_text(), "tiny", tomllib.loads(lock_text())["adapters"]["tiny"])
    assert (entry.repo, entry.commit, entry.files["adapter_config.json"].size) == (REPO, COMMIT, 12)


# -- a server whose answers would lead paths out of the download folder: (id, crafted answer, fragment) --

def listed(**entry):
    return lambda repo: repo.extra_tree.append({"type": "file", "oid": "0" * 40, "size": 3, **entry})


CRAFTED = [
    ("../ in a name", listed(path="../../etc/x"),
     "lists a file named '../../etc/x', which would land outside its folder"),
    ("absolute name", listed(path="/etc/x"), "lists a file named '/etc/x', which would land outside"),
    ("backslashes", listed(path="..\\..\\x"), "which would land outside its folder"),
    ("drive letter", listed(path="C:/x"), "lists a file named 'C:/x', which would land outside"),
    ("'.' part", listed(path="a/./b"), "lists a file named 'a/./b'"),
    ("control character", listed(path="a\nb"), "lists a file named 'a\\nb'"),
    ("name not a string", listed(path=5), "lists a file named 5, which would land outside"),
    ("folder named ..", lambda repo: repo.extra_tree.append({"type": "directory", "oid": "0" * 40, "size": 0,
                                                            "path": ".."}), "lists a file named '..'"),
    ("size a string", listed(path="adapter_model.safetensors", size="big"), "with size 'big', not a byte count"),
    ("size negative", listed(path="adapter_model.safetensors", size=-1), "with size -1, not a byte count"),
    ("lfs sha256 not hex", listed(path="adapter_model.safetensors", lfs={"oid": "zz", "size": 3, "pointerSize": 1}),
     "with sha256 'zz', not 64 hex digits"),
    ("blob id not hex", listed(path="adapter_config.json", oid="../x"), "with git blob id '../x', not 40 hex digits"),
    ("entry without oid", lambda repo: repo.extra_tree.append({"type": "file", "path": "x", "size": 1}),
     "sent a listing of org/tiny-lora@"),
    ("entry not a mapping", lambda repo: repo.extra_tree.append("x"), "that cannot be read (TypeError"),
    ("commit sha with ../", lambda repo: repo.info_override.update(sha="../../../x"),
     "gave '../../../x' as the commit of org/tiny-lora@main, not 40 hex digits; refused"),
    ("commit sha not a string", lambda repo: repo.info_override.update(sha=["a"]), "gave ['a'] as the commit"),
]


@pytest.fixture
def crafted_hub(tmp_path, monkeypatch):
    server = FakeHub().start()
    server.add(REPO, adapter_files(), tags=["lora"])
    online(monkeypatch, server.url, tmp_path)
    yield server
    server.stop()


@pytest.mark.parametrize("craft,fragment", [r[1:] for r in CRAFTED], ids=[r[0] for r in CRAFTED])
def test_a_crafted_listing_never_leads_out_of_the_folder(crafted_hub, tmp_path, craft, fragment):
    craft(crafted_hub.repos[REPO])
    assert_one_line_error(run_cli("--quiet", "hub", "pull", REPO), fragment)
    assert not crafted_hub.downloads_done() and not (tmp_path / lockfile.LOCK_FILE).exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name in ("x", "b")]


def test_an_uncrafted_pull_from_the_same_server_works(crafted_hub):
    """The crafted rows above each differ from this in one answer only."""
    report = hub.pull(REPO)
    assert sorted(report["files"]) == ["adapter_config.json", "adapter_model.safetensors"]


# The same answers for an `org/name` that huggingface_hub's snapshot_download fetches (merge, inspect,
# convert, train --base): its own refusal, or an answer it cannot read, becomes one line too.
CRAFTED_SNAPSHOT = [
    ("../ in a name", listed(path="../../etc/x.json"), "(ValueError: Invalid filename '../../etc/x.json'"),
    ("absolute name", listed(path="/etc/x.json"), "(ValueError: Invalid filename '/etc/x.json'"),
    ("backslashes", listed(path="..\\..\\x.json"), "(ValueError: Invalid filename"),
    ("entry without oid", lambda repo: repo.extra_tree.append({"type": "file", "path": "x.json", "size": 1}),
     "(KeyError: 'oid')"),
]


@pytest.mark.parametrize("craft,fragment", [r[1:] for r in CRAFTED_SNAPSHOT], ids=[r[0] for r in CRAFTED_SNAPSHOT])
def test_a_crafted_listing_never_leads_out_of_a_snapshot(crafted_hub, tmp_path, craft, fragment):
    craft(crafted_hub.repos[REPO])
    with pytest.raises(AdaptkitError) as info:
        hub.resolve(REPO)
    message = str(info.value)
    assert message.startswith(f"{REPO}: huggingface_hub refused what the Hub at {crafted_hub.url} sent ")
    assert fragment in message and "\n" not in message
    assert not [p for p in tmp_path.rglob("x.json")]
