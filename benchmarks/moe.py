"""`adaptkit moe` side by side with `mergekit-moe` (mergekit 0.1.5) on the same YAML.

Inputs: benchmarks/merge.py's 168M Llama-shaped bf16 models (a base and three fine-tunes, built there
once), hard-linked into benchmarks/_work/moe/ with a tokenizer of one token per printable character
(the prompts' gates need one). Each tool runs as its own process, one after the other, inputs in the
page cache; measured as benchmarks/merge.py measures (wall seconds, seconds after imports, peak RSS
polled and from the kernel's high-water mark). Jobs (every output mergekit-moe writes):

  mixtral-random    base + 3 experts, gate_mode random (seeded: --seed 0 / --random-seed 0), bf16
  mixtral-hidden    the same with prompts, gate_mode hidden (the base runs on the prompts in bf16)
  qwen-hidden       2 experts + the base as shared expert with prompts (Qwen2-MoE), gate_mode hidden
  deepseek-random   2 experts + the base as shared expert without prompts (DeepSeek MoE), random

The outputs are compared tensor by tensor (mergekit writes Mixtral's experts fused, adaptkit one
tensor per expert: mapped before comparing).

    .venv/bin/python benchmarks/moe.py [--runs N] [--jobs a,b]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as M  # noqa: E402  (the models, the launcher and the measuring of benchmarks/merge.py)

WORK = M.ROOT / "_work" / "moe"
PROMPTS = [["Hello, who are you?", "I need help with"], ["As a doctor of medicine,"],
           ["> get ye flask", "[Mode: Interactive Storyteller]"], ["Solve for x: 2x + 3 = 7"]]


def models() -> dict[str, Path]:
    """The merge benchmark's models with a tokenizer beside them (weights hard-linked, not copied)."""
    built = M.build_with_model(M.WORK / "default" / "models", M.SHAPES["default"])
    from mergekit_suite import _tokenizer

    tokenizer = None
    paths = {}
    for name in ("base", "ft1", "ft2", "ft3"):
        folder = WORK / "models" / name
        if not (folder / "tokenizer.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for f in built[name].iterdir():
                if f.is_file() and not f.name.startswith("."):
                    os.link(f, folder / f.name)
            tokenizer = tokenizer or _tokenizer("chars")
            tokenizer.save_pretrained(folder)
        paths[name] = folder
    return paths


def config(job: str, paths: dict[str, Path]) -> dict:
    mode = "random" if job.endswith("random") else "hidden"
    count = 3 if job.startswith("mixtral") else 2
    experts = [{"source_model": str(paths[f"ft{i + 1}"]), **({"positive_prompts": PROMPTS[i]} if mode == "hidden"
                                                            else {})} for i in range(count)]
    out = {"base_model": str(paths["base"]), "gate_mode": mode, "dtype": "bfloat16", "experts": experts}
    if not job.startswith("mixtral"):
        shared = {"source_model": str(paths["base"])}
        if job.startswith("qwen"):
            shared["positive_prompts"] = PROMPTS[3]
        out["shared_experts"] = [shared]
    return out


def command(tool: str, recipe: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        return M.stamped("from mergekit.scripts.moe import main",
                         ["mergekit-moe", str(recipe), str(out), "--random-seed", "0", "--device", "cpu", "--quiet"],
                         "main()")
    # imports as the command makes them, so that "work" leaves them out for both tools (mergekit-moe imports
    # transformers and its Llama model at start; adaptkit when a gate mode needs the base to run)
    modules = "import adaptkit.merge.moe"
    if yaml.safe_load(recipe.read_text())["gate_mode"] != "random":
        modules += "; import transformers.models.llama.modeling_llama; from transformers import AutoTokenizer"
    return M.stamped(M.HEAVY_IMPORTS.format(modules=modules),
                     ["adaptkit", "--quiet", "moe", str(recipe), "-o", str(out), "--seed", "0", "--force"],
                     "sys.exit(main())")


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def unfused(tensors: dict) -> dict:
    """mergekit's fused Mixtral experts (gate_up_proj E × 2I × H: w1 rows then w3 rows; down_proj
    E × H × I) and router (`mlp.gate`) in adaptkit's names, one tensor per expert."""
    out = {}
    for name, t in tensors.items():
        layer = name.split(".mlp.")[0]
        if name.endswith(".mlp.experts.gate_up_proj"):
            for e, (w1, w3) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = w3
        elif name.endswith(".mlp.experts.down_proj"):
            for e, w2 in enumerate(t):
                out[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = w2
        elif name.endswith(".mlp.gate.weight"):
            out[f"{layer}.block_sparse_moe.gate.weight"] = t
        else:
            out[name] = t
    return out


def compare(ours: Path, theirs: Path, job: str) -> str:
    import torch

    a, m = tensors(ours), tensors(theirs)
    if job.startswith("mixtral"):
        m = unfused(m)
    if a.keys() != m.keys():
        return (f"names differ: only adaptkit {sorted(a.keys() - m.keys())[:3]}, only mergekit "
                f"{sorted(m.keys() - a.keys())[:3]}")
    unequal = [n for n in m if a[n].dtype != m[n].dtype or not torch.equal(a[n], m[n])]
    if not unequal:
        return f"{len(m)} tensors byte-identical"
    worst = max(unequal, key=lambda n: float((a[n].float() - m[n].float()).abs().max()))
    return f"{len(unequal)}/{len(m)} tensors differ, worst {worst}"


def line(job: str, peer, ours, detail: str) -> None:
    """One job's result as it finishes (mergekit's and adaptkit's `merge.Run`s)."""
    print(f"{job:<16} mergekit {peer.seconds:6.2f} s (work {peer.work:5.2f}, {peer.peak_mb:5.0f} MB)  adaptkit "
          f"{ours.seconds:6.2f} s (work {ours.work:5.2f}, {ours.peak_mb:5.0f} MB)  time {ours.seconds / peer.seconds:.3f}"
          f"  work {ours.work / peer.work:.3f}  RSS {ours.peak_mb / peer.peak_mb:.3f}  {detail}", flush=True)


def table(first: str, rows: list) -> None:
    """The jobs as a markdown table: (name, mergekit's Run, adaptkit's Run, outputs) each."""
    print(f"\n| {first} | mergekit s | adaptkit s | time ratio | work s mergekit / adaptkit | work ratio | peak MB "
          "mergekit / adaptkit | RSS ratio | outputs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job, peer, ours, detail in rows:
        print(f"| {job} | {peer.seconds:.2f} | {ours.seconds:.2f} | {ours.seconds / peer.seconds:.3f} | "
              f"{peer.work:.2f} / {ours.work:.2f} | {ours.work / peer.work:.3f} | {peer.peak_mb:.0f} / {ours.peak_mb:.0f} "
              f"| {ours.peak_mb / peer.peak_mb:.3f} | {detail} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", default="mixtral-random,mixtral-hidden,qwen-hidden,deepseek-random")
    args = parser.parse_args()
    paths = models()
    M.warm_cache(*paths.values())
    rows = []
    for job in args.jobs.split(","):
        recipe = WORK / f"{job}.yml"
        recipe.write_text(yaml.safe_dump(config(job, paths), sort_keys=False))
        runs = {tool: M.run_tool(tool, command(tool, recipe, WORK / "out" / f"{job}-{tool}"),
                                 WORK / "out" / f"{job}-{tool}", args.runs) for tool in ("mergekit", "adaptkit")}
        detail = compare(WORK / "out" / f"{job}-adaptkit", WORK / "out" / f"{job}-mergekit", job)
        peer, ours = runs["mergekit"], runs["adaptkit"]
        rows.append((job, peer, ours, detail))
        line(job, peer, ours, detail)
    table("job", rows)
    print(f"\n(median of {args.runs}; {statistics.median([r[1].seconds for r in rows]):.1f} s mergekit's median job)")


if __name__ == "__main__":
    main()
