"""`adaptkit extract` against `mergekit-extract-lora`: full fine-tune → LoRA at rank 32.

Job: the 168M Llama-shaped base of benchmarks/merge.py (hidden 1024, 8 layers, bf16) and a
fine-tune made from it: base + the merge benchmark's rank-16 all-linear LoRA merged in + its ft1
noise (N(0, 1e-3)), so every linear layer's ΔW has 16 strong directions over a noise floor.
Both tools run as their own process (imports included; "work" after imports), measured as in
merge.py (GNU time's high-water mark and psutil polling). Then, for every module both tools
factored, the relative Frobenius error ‖ΔW − s·B·A‖ / ‖ΔW‖ against the true ΔW (float64).

    .venv/bin/python benchmarks/extract.py [--runs N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as bench  # noqa: E402  (the merge benchmark's models and measuring)

RANK = 32


def ensure_models() -> dict[str, Path]:
    work = bench.WORK / "default"
    paths = {"base": work / "models" / "base", "ft1": work / "models" / "ft1", "lora": work / "models" / "lora-r16"}
    if not all(bench.done_marker(p).exists() or bench.has_weights(p) for p in paths.values()):
        paths.update(bench.build_with_model(work / "models", bench.SHAPES["default"]))
    ft = work / "models" / "ft-lowrank"
    if not bench.has_weights(ft):
        from adaptkit.merge.engine import run_merge

        run_merge({"merge_method": "task_arithmetic", "base_model": str(paths["base"]), "dtype": "bfloat16",
                   "models": [{"model": str(paths["ft1"]), "parameters": {"weight": 1.0}},
                              {"model": f"{paths['base']}+{paths['lora']}", "parameters": {"weight": 1.0}}]},
                  ft, progress=False)
    paths["ft"] = ft
    return paths


def mergekit_cmd(paths, out: Path) -> list[str]:
    return bench.stamped("from mergekit.scripts.extract_lora import main",
                         ["mergekit-extract-lora", "--model", str(paths["ft"]), "--base-model", str(paths["base"]),
                          "--out-path", str(out), "--max-rank", str(RANK)], "main()")


def adaptkit_cmd(paths, out: Path) -> list[str]:
    return bench.stamped(bench.HEAVY_IMPORTS.format(modules="import adaptkit.files.convert"),
                         ["adaptkit", "--quiet", "extract", "--model", str(paths["ft"]), "--base", str(paths["base"]),
                          "--rank", str(RANK), "-o", str(out), "--force"], "sys.exit(main())")


def errors(folder: Path, paths) -> dict[str, float]:
    """Module -> relative error of its factors against the true ΔW."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ft, base = (safe_open(str(paths[k] / "model.safetensors"), "pt") for k in ("ft", "base"))
    found = {}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith("lora_A.weight")):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = f.get_tensor(key).double()
            b = f.get_tensor(key.replace("lora_A", "lora_B")).double()
            r = rank_pattern.get(module, config["r"])
            scale = alpha_pattern.get(module, config["lora_alpha"]) / r
            delta = ft.get_tensor(f"{module}.weight").double() - base.get_tensor(f"{module}.weight").double()
            found[module] = float((delta - scale * b @ a).norm() / delta.norm())
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    paths = ensure_models()
    bench.warm_cache(paths["ft"], paths["base"])
    out = bench.WORK / "extract"
    runs = {"mergekit": bench.run_tool("mergekit", mergekit_cmd(paths, out / "mergekit"), out / "mergekit", args.runs),
            "adaptkit": bench.run_tool("adaptkit", adaptkit_cmd(paths, out / "adaptkit"), out / "adaptkit", args.runs)}
    errs = {tool: errors(out / tool, paths) for tool in runs}
    common = sorted(set(errs["mergekit"]) & set(errs["adaptkit"]))
    m, a = runs["mergekit"], runs["adaptkit"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; rank {RANK}; {len(common)} modules factored by both")
    for tool, r in runs.items():
        for note in r.notes:
            print(f"  note: {note}")
    print("\n| tool | s | work s | peak MB | mean error | max error |\n|---|---|---|---|---|---|")
    for tool, r in runs.items():
        e = [errs[tool][k] for k in common]
        print(f"| {tool} | {r.seconds:.2f} | {r.work:.2f} | {r.peak_mb:.0f} | {statistics.mean(e):.6f} | {max(e):.6f} |")
    worse = [k for k in common if errs["adaptkit"][k] > errs["mergekit"][k] * (1 + 1e-4) + 1e-7]
    print(f"\ntime ratio {a.seconds / m.seconds:.3f} (target ≤ 1/2) {'✓' if a.seconds <= m.seconds / 2 else '✗'}; "
          f"RSS ratio {a.peak_mb / m.peak_mb:.3f} (target ≤ 1/2) {'✓' if a.peak_mb <= m.peak_mb / 2 else '✗'}; "
          f"modules where adaptkit's error is worse: {len(worse)}{' ' + ', '.join(worse[:3]) if worse else ''}")


if __name__ == "__main__":
    main()
