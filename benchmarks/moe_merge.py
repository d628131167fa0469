"""`adaptkit merge` against mergekit 0.1.5 on mixture-of-experts models (Mixtral-shaped, bf16).

mergekit 0.1.5 merges a MoE checkpoint's experts stacked, as transformers 5 loads them (all experts of a
layer in one `mlp.experts.gate_up_proj` / `down_proj`); adaptkit does the same for every method but an
elementwise one without filters (adaptkit/merge/converted.py), and writes the result per expert, as the
checkpoint stores it. This measures what that costs: wall seconds, seconds after imports and peak RSS of
each tool on the same recipe, as benchmarks/merge.py measures them, and whether the outputs are equal
(mergekit's stacked tensors split per expert before comparing).

Models (built once into benchmarks/_work/moe_merge/, safetensors): a Mixtral of hidden 512, 4 layers,
8 experts of intermediate 1408, vocab 32000 (≈106M parameters, 212 MB in bf16) with random weights,
and two fine-tunes = base + N(0, 1e-3) noise (seeds 1, 2). Jobs: linear (0.5/0.5: not stacked),
slerp (t 0.4 with `filter: mlp` at 0.7), ties (density 0.5, weights 0.6/0.4), model_stock, karcher.

    .venv/bin/python benchmarks/moe_merge.py [--runs N] [--jobs linear,slerp,...]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as M  # noqa: E402  (the launcher and the measuring of benchmarks/merge.py)
import moe  # noqa: E402  (mergekit's stacked experts split per expert, and the comparison)

WORK = M.ROOT / "_work" / "moe_merge"
SHAPE = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)
JOBS = ("linear", "slerp", "ties", "model_stock", "karcher")


def build() -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    paths = {name: WORK / "models" / name for name in ("base", "ft1", "ft2")}
    if all(M.has_weights(p) for p in paths.values()):
        return paths
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(paths["base"])
    base = load_file(paths["base"] / "model.safetensors")
    for seed, name in enumerate(("ft1", "ft2"), start=1):
        g = torch.Generator().manual_seed(seed)
        paths[name].mkdir(parents=True, exist_ok=True)
        for side in ("config.json", "generation_config.json"):
            shutil.copy(paths["base"] / side, paths[name] / side)
        save_file({k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()},
                  paths[name] / "model.safetensors", metadata={"format": "pt"})
    return paths


def recipe(job: str, paths: dict[str, Path]) -> dict:
    base, ft1, ft2 = (str(paths[n]) for n in ("base", "ft1", "ft2"))
    common = {"merge_method": job, "dtype": "bfloat16"}
    if job == "linear":
        return {**common, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (ft1, ft2)]}
    if job == "slerp":
        return {**common, "base_model": base, "models": [{"model": ft1}],
                "parameters": {"t": [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]}}
    if job == "ties":
        return {**common, "base_model": base, "models": [{"model": ft1, "parameters": {"density": 0.5, "weight": 0.6}},
                                                         {"model": ft2, "parameters": {"density": 0.5, "weight": 0.4}}]}
    if job == "karcher":
        return {**common, "models": [{"model": m} for m in (base, ft1, ft2)]}
    return {**common, "base_model": base, "models": [{"model": ft1}, {"model": ft2}]}  # model_stock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", default=",".join(JOBS))
    args = parser.parse_args()
    paths = build()
    M.warm_cache(*paths.values())
    rows = []
    for job in args.jobs.split(","):
        path = WORK / f"{job}.yml"
        path.write_text(yaml.safe_dump(recipe(job, paths), sort_keys=False))
        out = {tool: WORK / "out" / f"{job}-{tool}" for tool in ("mergekit", "adaptkit")}
        peer = M.run_tool("mergekit", M.mergekit_cmd(path, out["mergekit"]), out["mergekit"], args.runs)
        ours = M.run_tool("adaptkit", M.adaptkit_cmd("merge", str(path), "-o", str(out["adaptkit"]), "--force"),
                          out["adaptkit"], args.runs)
        detail = moe.compare(out["adaptkit"], out["mergekit"], "mixtral")
        rows.append((job, peer, ours, detail))
        moe.line(job, peer, ours, detail)
    moe.table("method", rows)
    print(f"\n(median of {args.runs} runs; largest peak)")


if __name__ == "__main__":
    main()
