"""`adaptkit hub`: search, pull, sync and push through the real huggingface_hub client, pointed by
HF_ENDPOINT at a Hub-protocol server on 127.0.0.1 (tests/hub_server.py) serving adapters made here."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.hub import repos as hub
from adaptkit.hub import lockfile
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from builders import tiny_llama
from hub_server import FakeHub, online, refused_url

BASE_ID = "org/tiny-llama"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama and three adapters for it, made and saved by adaptkit itself."""
    root = tmp_path_factory.mktemp("hub-folders")
    base = tiny_llama()
    base.save_pretrained(root / "base")

    def adapter(name: str, variant: str, seed: int, **config) -> Path:
        torch.manual_seed(seed)
        ak.inject(copy.deepcopy(base), variant, **config).save(root / name)
        path = root / name / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": BASE_ID}))
        return root / name

    return {"base": root / "base",
            "lora": adapter("lora", "lora", 1, r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            "lora2": adapter("lora2", "lora", 2, r=4, target_modules=["q_proj"], init_lora_weights=False),
            "ia3": adapter("ia3", "ia3", 3, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                           init_ia3_weights=False)}


def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture
def fake_hub(folders, tmp_path, monkeypatch):
    server = FakeHub(page_size=2).start()
    base_tags = [f"base_model:{BASE_ID}", f"base_model:adapter:{BASE_ID}"]
    server.add("org/tiny-lora", folders["lora"], tags=["peft", "lora", "safetensors", *base_tags], downloads=500,
               likes=3)
    server.add("org/other-lora", folders["lora2"], tags=["lora"], downloads=20, likes=9, card={"base_model": BASE_ID})
    server.add("alice/ia3-adapter", folders["ia3"], tags=["peft", "adapter", "ia3", *base_tags], downloads=100, likes=1)
    server.add("bob/unrelated-lora", folders["lora2"], tags=["lora", "base_model:adapter:other/base"], downloads=5)
    server.add(BASE_ID, folders["base"], tags=["transformers", "llama"], downloads=1000)
    server.add("org/dataset-ish", {"data.csv": b"a,b\n1,2\n"}, tags=["csv"])
    online(monkeypatch, server.url, tmp_path)
    yield server
    server.stop()


def run(*args):
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    text = result.stderr.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached(repo: str, file: str, commit: str):
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, file, revision=commit)
    return found if isinstance(found, str) else None


# ------------------------------------------------------------------------------------------- the happy paths


def test_search_filters_sorts_and_follows_pages(fake_hub):
    rows = ak.hub.search()
    # Any of lora/peft/adapter; the full model and the CSV repo are not listed. By downloads.
    assert [r["repo"] for r in rows] == ["org/tiny-lora", "alice/ia3-adapter", "org/other-lora", "bob/unrelated-lora"]
    first, ia3, other, bob = rows
    assert (first["variant"], first["base_model"], first["downloads"], first["likes"]) == ("lora", BASE_ID, 500, 3)
    assert ia3["variant"] == "ia3" and other["base_model"] == BASE_ID and bob["base_model"] == "other/base"
    assert first["updated"].startswith("2024-01-01")
    # page_size=2 on the server: the client followed Link headers (3 repos carry "lora").
    assert fake_hub.count("GET", r"^/api/models\?.*cursor=2")
    assert [r["repo"] for r in ak.hub.search(sort="likes")][:2] == ["org/other-lora", "org/tiny-lora"]
    assert [r["repo"] for r in ak.hub.search(sort="updated")][0] == "bob/unrelated-lora"
    assert [r["repo"] for r in ak.hub.search(base_model=BASE_ID)] == ["org/tiny-lora", "alice/ia3-adapter"]
    assert [r["repo"] for r in ak.hub.search("ia3")] == ["alice/ia3-adapter"]
    assert [r["repo"] for r in ak.hub.search(author="org")] == ["org/tiny-lora", "org/other-lora"]
    assert [r["repo"] for r in ak.hub.search(tags=["ia3"])] == ["alice/ia3-adapter"]
    assert [r["repo"] for r in ak.hub.search(limit=3)] == [r["repo"] for r in rows[:3]]

    result = run("hub", "search", "--sort", "likes", "--json")
    assert json.loads(result.stdout) == ak.hub.search(sort="likes")
    text = run("hub", "search", "lora", "--author", "org").stdout.splitlines()
    assert text[0].split() == ["repo", "variant", "base", "model", "downloads", "likes", "updated"]
    assert text[1].split()[:3] == ["org/tiny-lora", "lora", BASE_ID] and len(text) == 3
    with pytest.raises(AdaptkitError, match="unknown sort 'stars'"):
        ak.hub.search(sort="stars")


def test_pull_then_merge_end_to_end(fake_hub, folders, tmp_path):
    report = json.loads(run("hub", "pull", "org/tiny-lora", "--json").stdout)
    commit = fake_hub.repos["org/tiny-lora"].refs["main"]
    assert (report["name"], report["commit"], report["revision"]) == ("tiny-lora", commit, "main")
    assert (report["variant"], report["base_model"]) == ("lora", BASE_ID)
    assert sorted(report["downloaded"]) == ADAPTER_FILES
    entry = lockfile.read("adaptkit.lock").entries["tiny-lora"]
    assert (entry.repo, entry.commit, entry.pinned) == ("org/tiny-lora", commit, False)
    for name in ADAPTER_FILES:
        in_cache = cached("org/tiny-lora", name, commit)
        assert entry.files[name].sha256 == sha256(folders["lora"] / name) == sha256(in_cache)

    # The lock name works wherever a path does: the quick merge form, a recipe, inspect, convert.
    assert run("merge", "--base", folders["base"], "-m", "tiny-lora", "-o", "via-lock").exit_code == 0
    assert run("merge", "--base", folders["base"], "-m", folders["lora"], "-o", "direct").exit_code == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(folders["base"]),
                                      "models": [{"model": f"org/tiny-lora@{commit}", "parameters": {"weight": 1.0}}]}))
    assert run("merge", recipe, "-o", "via-recipe").exit_code == 0
    expected = load_file(tmp_path / "direct" / "model.safetensors")
    for out in ("via-lock", "via-recipe"):
        got = load_file(tmp_path / out / "model.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert ak.inspect("tiny-lora")["adapter"]["variant"] == "lora"
    ak.load_adapter(tiny_llama(), "tiny-lora")
    assert json.loads(run("inspect", "tiny-lora", "--json").stdout)["kind"] == "adapter"
    assert run("convert", "tiny-lora", "--to", "peft", "--rank", "1", "-o", "r1").exit_code == 0


def test_second_pull_makes_no_download(fake_hub):
    hub.pull("org/tiny-lora")
    gets, heads = fake_hub.downloads_done(), fake_hub.count("HEAD")
    again = hub.pull("org/tiny-lora")
    assert again["downloaded"] == [] and fake_hub.downloads_done() == gets and fake_hub.count("HEAD") == heads
    assert "all already in the cache" in run("hub", "pull", "org/tiny-lora").stdout


def test_sync_updates_unpinned_entries_and_shows_the_diff(fake_hub, folders):
    old = fake_hub.repos["org/tiny-lora"].refs["main"]
    pinned = fake_hub.repos["org/other-lora"].refs["main"]
    hub.pull("org/tiny-lora")
    hub.pull(f"org/other-lora@{pinned}", name="pinned")
    config = json.loads((folders["lora"] / "adapter_config.json").read_text())
    new = fake_hub.commit("org/tiny-lora", {"README.md": b"# v2\n",
                                             "adapter_config.json": json.dumps({**config, "lora_alpha": 7}).encode()})
    fake_hub.commit("org/other-lora", {"README.md": b"# v2\n"})

    rows = {r["name"]: r for r in hub.sync()["entries"]}
    assert (rows["tiny-lora"]["status"], rows["tiny-lora"]["commit"], rows["tiny-lora"]["latest"]) == ("ok", old, new)
    assert rows["pinned"]["pinned"] and rows["pinned"]["commit"] == pinned
    assert "(adaptkit hub sync --update)" in run("hub", "sync").stdout

    text = run("hub", "sync", "--update").stdout
    assert "updated" in text and "+README.md ~adapter_config.json" in text, text
    entries = lockfile.read().entries
    assert entries["tiny-lora"].commit == new and entries["pinned"].commit == pinned
    assert entries["tiny-lora"].files["README.md"].sha256 == hashlib.sha256(b"# v2\n").hexdigest()
    assert ak.inspect("tiny-lora")["adapter"]["alpha"] == 7


def test_sync_detects_a_tampered_cached_file(fake_hub, monkeypatch):
    commit = hub.pull("org/tiny-lora")["commit"]
    weights = cached("org/tiny-lora", "adapter_model.safetensors", commit)
    blob = Path(os.path.realpath(weights))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))

    with monkeypatch.context() as m:
        offline(m)
        one_line_error(run("hub", "sync"), "1 entry incomplete (tiny-lora)")
        assert "corrupt in the cache: adapter_model.safetensors" in run("hub", "sync").stdout
        with pytest.raises(AdaptkitError, match="adapter_model.safetensors is corrupt in the cache"):
            hub.resolve("tiny-lora")  # never used as it is
    report = hub.sync()
    assert report["ok"] and report["entries"][0]["repaired"] == ["adapter_model.safetensors"]
    assert sha256(cached("org/tiny-lora", "adapter_model.safetensors", commit)) == \
        lockfile.read().entries["tiny-lora"].files["adapter_model.safetensors"].sha256


def test_offline_sync_and_lock_names_work_from_the_cache(fake_hub, folders, monkeypatch):
    commit = hub.pull("org/tiny-lora")["commit"]
    fake_hub.stop()
    offline(monkeypatch)
    result = run("hub", "sync")
    assert result.exit_code == 0 and result.stdout.startswith("ok"), result.output
    assert run("merge", "--base", folders["base"], "-m", "tiny-lora", "-o", "merged").exit_code == 0
    one_line_error(run("hub", "pull", "org/tiny-lora"), "HF_HUB_OFFLINE is set")

    os.unlink(cached("org/tiny-lora", "adapter_config.json", commit))
    result = run("hub", "sync", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and report["entries"][0]["missing"] == ["adapter_config.json"]
    assert "missing from the cache: adapter_config.json" in run("hub", "sync").stdout
    one_line_error(run("merge", "--base", folders["base"], "-m", "tiny-lora", "-o", "merged2"),
                   "adapter_config.json is not in the cache and HF_HUB_OFFLINE is set")


def test_push_then_pull_round_trips(fake_hub, folders):
    report = json.loads(run("hub", "push", folders["lora"], "me/pushed-lora", "--private", "--json").stdout)
    repo = fake_hub.repos["me/pushed-lora"]
    assert repo.private and report["commit"] == repo.refs["main"]
    card = repo.commit("main").files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == BASE_ID and {"peft", "lora", "adaptkit"} <= set(meta["tags"])
    assert "A lora adapter (rank 2) for `org/tiny-llama`" in card

    pulled = hub.pull("me/pushed-lora")
    assert sorted(pulled["files"]) == ["README.md", *ADAPTER_FILES]
    for name in ADAPTER_FILES:
        assert pulled["files"][name]["sha256"] == sha256(folders["lora"] / name)
    one_line_error(run("hub", "push", folders["base"], "me/not-an-adapter"), "is a model, not an adapter")


# ----------------------------------------------------------------------------------------------- bad input


def test_unknown_repo_revision_and_file_are_one_line_errors(fake_hub):
    one_line_error(run("hub", "pull", "org/nope"), "no Hub repository 'org/nope'")
    one_line_error(run("hub", "pull", "org/tiny-lora@v9"), "org/tiny-lora has no revision 'v9'")
    fake_hub.repos["org/tiny-lora"].hidden.add("adapter_model.safetensors")
    one_line_error(run("hub", "pull", "org/tiny-lora"), "has no file 'adapter_model.safetensors'")
    one_line_error(run("hub", "pull", "not a ref"), "not a Hub reference")
    assert not Path("adaptkit.lock").exists()


def test_a_repo_that_is_not_an_adapter_says_what_it_is(fake_hub):
    one_line_error(run("hub", "pull", BASE_ID), f"{BASE_ID} is a full model (LlamaForCausalLM), not an adapter")
    one_line_error(run("hub", "pull", "org/dataset-ish"), "no adapter_config.json (it holds data.csv)")


def test_server_errors_are_retried_then_reported(fake_hub):
    fake_hub.fail(r"^/api/models/org/tiny-lora", 503, times=2)
    fake_hub.fail(r"/resolve/.*/adapter_model.safetensors", 500, times=1)
    assert sorted(hub.pull("org/tiny-lora")["downloaded"]) == ADAPTER_FILES
    fake_hub.fail(r"^/api/models/org/other-lora", 500, times=100)
    one_line_error(run("hub", "pull", "org/other-lora"), "answered 500 Internal Server Error", "4 time(s)")
    fake_hub.faults.clear()
    fake_hub.fail(r"^/api/models/org/other-lora", 503, times=100)
    with pytest.raises(AdaptkitError, match="answered 503 Service Unavailable"):
        hub.pull("org/other-lora")


def test_a_refused_connection_is_one_clear_line(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", refused_url())
    text = one_line_error(run("hub", "pull", "org/tiny-lora"), "cannot reach the Hub at http://127.0.0.1:")
    assert "refused" in text.lower()
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's own backoff on listing pages
    one_line_error(run("hub", "search"), "cannot reach the Hub")


def test_a_download_cut_mid_file_resumes_or_fails_cleanly(fake_hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 64)  # so 64 bytes land before the cut
    fake_hub.cut(r"org/tiny-lora/.*adapter_model", after=100, times=1)
    report = hub.pull("org/tiny-lora")
    ranges = [v for m, p, h in fake_hub.log if m == "GET" and "adapter_model" in p
              for k, v in h.items() if k.lower() == "range"]
    assert ranges == ["bytes=64-"]  # resumed where the written part ended
    assert report["files"]["adapter_model.safetensors"]["sha256"] == \
        sha256(cached("org/tiny-lora", "adapter_model.safetensors", report["commit"]))

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub waits 1 s per resume
    fake_hub.cut(r"org/other-lora/.*adapter_model", after=0, times=1000)
    one_line_error(run("hub", "pull", "org/other-lora"), "kept breaking off", "nothing partial was kept")
    commit = fake_hub.repos["org/other-lora"].refs["main"]
    assert cached("org/other-lora", "adapter_model.safetensors", commit) is None
    assert not list(Path("hf-cache").rglob("*.incomplete"))
    assert "other-lora" not in lockfile.read().entries

    fake_hub.faults.clear()
    fake_hub.corrupt(r"org/other-lora/.*adapter_model", times=1)
    with pytest.raises(AdaptkitError, match="adapter_model.safetensors arrived as .* removed it from the cache"):
        hub.pull("org/other-lora")
    assert cached("org/other-lora", "adapter_model.safetensors", commit) is None
    assert hub.pull("org/other-lora")["downloaded"] == ["adapter_model.safetensors"]


def test_a_malformed_lock_file_names_the_line(fake_hub, folders):
    lock = Path("adaptkit.lock")
    lock.write_text('version = 1\n\n[adapters."a"]\nrepo = "org/a"\ncommit = \n')
    with pytest.raises(AdaptkitError, match=r"adaptkit.lock line 5: not valid TOML \(invalid value\)"):
        lockfile.read()
    one_line_error(run("hub", "sync"), "adaptkit.lock line 5")
    one_line_error(run("merge", "--base", folders["base"], "-m", "a", "-o", "out"), "adaptkit.lock line 5")
    lock.write_text('version = 1\n\n[adapters."a"]\nrepo = "org/a"\n\n[adapters."a".files]\n')
    with pytest.raises(AdaptkitError, match=r"adaptkit.lock line 3: adapter 'a': 'commit' is missing"):
        lockfile.read()
    lock.write_text(f'[adapters.b]\nrepo = "org/b"\ncommit = "{"0" * 40}"\n'
                    f'files = {{ "../../x.json" = {{ size = 1, sha256 = "{"0" * 64}" }} }}\n')
    with pytest.raises(AdaptkitError, match=r"line 1: adapter 'b': file name '../../x.json' leaves the repository"):
        lockfile.read()


def test_file_names_that_escape_the_folder_are_refused(fake_hub):
    fake_hub.repos["org/tiny-lora"].extra_tree.append(
        {"type": "file", "oid": "0" * 40, "size": 3, "path": "../../evil.json"})
    one_line_error(run("hub", "pull", "org/tiny-lora"),
                   "'../../evil.json', which would land outside its folder; refused")
    assert not list(Path("hf-cache").rglob("evil.json")) and not Path("adaptkit.lock").exists()


def test_the_token_is_sent_but_never_printed(fake_hub, monkeypatch):
    secret = "hf_" + "S3cretT0ken" * 3
    monkeypatch.setenv("HF_TOKEN", secret)
    ok = run("hub", "pull", "org/tiny-lora")
    bad = run("hub", "pull", "org/nope")
    fake_hub.fail("^/api/models/org/other-lora", 401, times=10)
    denied = run("hub", "pull", "org/other-lora")
    assert ok.exit_code == 0 and bad.exit_code == 1 and denied.exit_code == 1
    assert all(secret not in r.output + r.stderr for r in (ok, bad, denied))
    sent = [v for _, _, h in fake_hub.log for k, v in h.items() if k.lower() == "authorization"]
    assert sent and set(sent) == {f"Bearer {secret}"}


def test_lock_file_round_trips(tmp_path):
    entry = lockfile.Entry(name="my.lora-1", repo="org/x", revision="v1.0", commit="a" * 40, variant="lora",
                           base_model='odd "base"', files={"adapter_config.json": lockfile.FileRecord(12, "b" * 64)})
    lock = lockfile.Lock(tmp_path / "adaptkit.lock", {entry.name: entry})
    lock.write()
    assert lockfile.read(tmp_path / "adaptkit.lock").entries == {entry.name: entry}
    assert not entry.pinned and lockfile.Entry("n", "org/x", "c" * 40, "c" * 40).pinned
    assert lockfile.read(tmp_path / "missing.lock").entries == {}


def kohya_file_bytes() -> bytes:
    """A kohya (sd-scripts) LoRA file: one UNet and one text-encoder module."""
    from safetensors.torch import save

    tensors = {}
    for name, width in {"lora_unet_down_blocks_0_attentions_0_proj_in": 320,
                        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": 768}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, width, dtype=torch.float16)
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, 4, dtype=torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    return save(tensors, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})


def test_single_file_kohya_lora_is_pulled_by_its_header(fake_hub):
    """kohya's and diffusers' LoRAs ship as one .safetensors file without adapter_config.json: the
    file's header (a ranged read) tells the format; only that file and the card are downloaded."""
    weights = kohya_file_bytes()
    fake_hub.add("sd/pixel-art-lora", {"pixel-art.safetensors": weights, "README.md": b"# pixel art\n",
                                       "preview.png": b"\x89PNG not really"}, tags=["lora", "stable-diffusion"])
    report = ak.hub.pull("sd/pixel-art-lora", name="pixel")
    assert sorted(report["files"]) == ["README.md", "pixel-art.safetensors"] and report["variant"] == "lora"
    assert report["files"]["pixel-art.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert not fake_hub.count("GET", r"/preview\.png")
    info = json.loads(run("inspect", "pixel", "--json").output)
    assert info["kind"] == "adapter" and info["adapter"]["format"] == "kohya"
    fake_hub.add("sd/two-loras", {"a.safetensors": weights, "b.safetensors": weights})
    one_line_error(run("hub", "pull", "sd/two-loras"), "several single-file adapters (a.safetensors, b.safetensors)")
    fake_hub.add("sd/not-lora", {"model.safetensors": _tensor_bytes()})
    one_line_error(run("hub", "pull", "sd/not-lora"), "no adapter_config.json (it holds model.safetensors)")


def _tensor_bytes() -> bytes:
    from safetensors.torch import save

    return save({"conv.weight": torch.zeros(2, 2)})
