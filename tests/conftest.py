"""Shared fixtures: tiny models built from configs, adapters written by PEFT itself, no network."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from builders import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers (single model.safetensors)."""
    out = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sharded_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers in several shards with an index."""
    out = tmp_path_factory.mktemp("llama-sharded")
    tiny_llama().save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture(scope="session")
def peft_lora_dir(tmp_path_factory) -> Path:
    """A LoRA adapter written by peft's save_pretrained, with rank_pattern and modules_to_save."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("peft-lora")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={"v_proj": 6}, modules_to_save=["lm_head"], init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(out)
    return out


@pytest.fixture
def fake_plugin_dist(tmp_path, monkeypatch):
    """Install a throw-away distribution on sys.path whose entry points are given per test."""
    from adaptkit import registry

    def make(dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = []
        for group, items in entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{name} = {target}" for name, target in items.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for name, source in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.reload()

    yield make
    registry.reload()
    for name in list(sys.modules):
        if name.startswith("fakeplug"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread is faster than several contending ones (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """`cache(folder, "org/name")`: put `folder` in a Hub cache as that repo's main snapshot; the Hub
    client runs offline against that cache."""
    import shutil

    root = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))

    def cache(folder: Path, repo: str, revision: str = "a" * 40) -> None:
        repo_dir = root / ("models--" + repo.replace("/", "--"))
        shutil.copytree(folder, repo_dir / "snapshots" / revision)
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(revision)

    return cache
