"""Make the README's pictures (docs/images/*.png) with the commands themselves, on the packaged MiniLM.

    .venv/bin/python docs/make_pictures.py          # about 10 minutes on 2 cores

1. `adaptkit train` three LoRAs on all-MiniLM-L6-v2 (examples/data/: sentiment twice, with different
   seeds and ranks, and topic), the first with `--plot` (loss and evaluation curves);
2. `adaptkit inspect` the rank-64 sentiment LoRA with `--plot` (the spectrum of its ΔW);
3. `adaptkit merge` the two tasks' LoRA bodies (heads split off) into one rank-16 adapter with `--plot`
   (each module's refactoring error);
4. `adaptkit quantize` MiniLM to NF4 with `--plot` (the error per tensor);
5. each LoRA (with its trained head) merged into MiniLM as a sequence classifier (a full model each),
   then `adaptkit soup sweep` from that MiniLM, its head untrained, to the sentiment model (WiSE-FT)
   and `adaptkit soup greedy` over the three, with `--plot`. A soup is scored by `score` below: its
   accuracy on the sentiment evaluation set.

The work goes to a temporary folder, removed at the end; only the pictures are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "examples" / "data"
IMAGES = HERE / "images"
#: What the LoRAs are trained with (as examples/demo.py trains them).
TRAINING = ["--max-steps", "40", "--batch-size", "16", "--lr", "1e-3", "--warmup", "0.1"]


def score(folder) -> float:
    """A soup's score (`--eval-py make_pictures:score`): the accuracy of the sequence classifier in `folder`
    on the sentiment evaluation set, its outputs read as the labels $PICTURES_LABELS (a JSON list)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = json.loads(os.environ["PICTURES_LABELS"])
    records = [json.loads(line) for line in (DATA / "sentiment_eval.jsonl").read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(os.environ["PICTURES_TOKENIZER"])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in records], padding=True, truncation=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1).tolist()
    return sum(labels[p] == r["label"] for p, r in zip(predicted, records)) / len(records)


def classifier(minilm: Path, out: Path) -> Path:
    """MiniLM as a 2-label sequence classifier (`bert.`-prefixed, as the LoRAs were trained on), head untrained."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).save_pretrained(out)
    return out


def adaptkit(*args) -> None:
    print("$ adaptkit", " ".join(map(str, args)), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", "adaptkit", "--quiet", *map(str, args)], check=True, env=env)


def split_head(adapter: Path, body: Path, head: Path) -> None:
    """The LoRA modules into `body`, the trained classification head into `head` (as examples/demo.py)."""
    from adaptkit.adapter import read_adapter
    from adaptkit.files.convert import to_lowrank, write
    from adaptkit.spec import LowRankAdapter

    lowrank, _ = to_lowrank(read_adapter(adapter))
    write(LowRankAdapter(lowrank.modules, {}, lowrank.config), "peft", body)
    write(LowRankAdapter({}, lowrank.saved, lowrank.config), "peft", head)
    shutil.copy(adapter / "training.json", head / "training.json")


def pictures(work: Path) -> None:
    from adaptkit.train.models import resolve_base

    minilm = resolve_base("minilm")
    runs = {"sentiment": ("sentiment", "64", "0"), "sentiment-seed1": ("sentiment", "8", "1"),
            "topic": ("topic", "8", "0")}
    for name, (task, rank, seed) in runs.items():
        plot = ["--eval", DATA / f"{task}_eval.jsonl", "--eval-every", "5", "--plot", IMAGES / "train-curves.png"] \
            if name == "sentiment" else []
        adaptkit("train", "--base", "minilm", "--variant", "lora", "--set", f"r={rank}",
                 "--set", f"lora_alpha={2 * int(rank)}", "--seed", seed, "--data", DATA / f"{task}_train.jsonl",
                 *TRAINING, *plot, "-o", work / name)
        split_head(work / name, work / f"{name}-body", work / f"{name}-head")
    adaptkit("inspect", work / "sentiment", "--plot", IMAGES / "inspect-spectrum.png")
    adaptkit("merge", "--method", "linear", "-m", f"{work / 'sentiment-body'}:0.5", "-m", f"{work / 'topic-body'}:0.5",
             "--rank", "16", "-o", work / "merged-lora", "--plot", IMAGES / "merge-errors.png")
    adaptkit("quantize", minilm, "--method", "nf4", "-o", work / "minilm-nf4", "--plot", IMAGES / "quantize-error.png")
    base = classifier(minilm, work / "minilm-classifier")
    for name in runs:
        adaptkit("merge", "--base", base, "-m", work / name, "-o", work / f"{name}-model")
    labels = json.loads((work / "sentiment" / "training.json").read_text())["labels"]
    os.environ.update(PICTURES_LABELS=json.dumps(labels), PICTURES_TOKENIZER=str(minilm))
    adaptkit("soup", "sweep", base, work / "sentiment-model", "--alphas", "0,0.2,0.4,0.6,0.8,1",
             "--eval-py", "make_pictures:score", "-o", work / "wise-ft", "--plot", IMAGES / "soup-sweep.png")
    adaptkit("soup", "greedy", *[a for name in runs for a in ("-m", work / f"{name}-model")],
             "--eval-py", "make_pictures:score", "-o", work / "greedy", "--plot", IMAGES / "soup-greedy.png")


def main() -> None:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    IMAGES.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="adaptkit-pictures-"))
    try:
        pictures(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for picture in sorted(IMAGES.glob("*.png")):
        print(f"{picture.relative_to(HERE.parent)}: {picture.stat().st_size / 1000:.0f} KB")


if __name__ == "__main__":
    main()
