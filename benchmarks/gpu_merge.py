"""`adaptkit merge --device cuda` against the CPU: the same bytes? how much faster? (issue 15; needs a GPU).

Every method of benchmarks/merge.py (and `tie_break: index` where it has a magnitude cut) on the same
168M bf16 Llama-shaped base and three fine-tunes, merged in this process on the CPU and then on the
GPU. Printed per job: the merge's seconds on each (after imports, as `--json` reports them; the GPU's
first job also pays CUDA's start-up, so a warm-up merge runs first), the ratio, the GPU's peak memory
(torch.cuda.max_memory_allocated) and whether every output tensor is byte-identical to the CPU's.

    python3 benchmarks/gpu_merge.py [--quick] [--methods a,b] [--out FILE.md]

--quick uses benchmarks/merge.py's small shape (39M). Models are built once into benchmarks/_work/gpu/.
On the lent GPU machine (no network; its python3 has torch, transformers, safetensors, click, tqdm, peft),
one command checks the device path and times it (adaptkit installed from the tree without its pins):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 -m pytest -q tests/test_cuda.py \
        && python3 benchmarks/gpu_merge.py --out $OUT/gpu_merge.md
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as bench  # noqa: E402  (benchmarks/merge.py: shapes, models, recipes)
from moe import tensors  # noqa: E402  (every tensor of an output folder)

from adaptkit.merge.engine import run_merge  # noqa: E402

WORK = bench.ROOT / "_work" / "gpu"


def same_bytes(a: dict, b: dict) -> tuple[int, int]:
    """(tensors that differ, tensors) between two outputs."""
    differ = sum(not torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a) if a.keys() == b.keys() \
        else len(a)
    return differ, len(a)


def jobs(paths: dict, methods: list[str]) -> list[tuple[str, Path]]:
    out = []
    for method in methods:
        recipe = bench.write_recipe(method, paths, "gpu")
        out.append((method, recipe))
        if method in bench.TIE_BREAK:
            out.append((f"{method} (index)", bench.indexed_recipe(recipe)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small shape (39M parameters)")
    ap.add_argument("--methods", help=f"comma-separated, default all: {','.join(bench.METHODS)}")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark compares a GPU's merges with the CPU's", file=sys.stderr)
        return 1
    shape = bench.SHAPES["quick" if args.quick else "default"]
    paths = bench.build_streamed(WORK / ("quick" if args.quick else "default") / "models", shape)
    methods = args.methods.split(",") if args.methods else list(bench.METHODS)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-merge-"))
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; model {shape}, bf16",
             "", "| method | CPU s | GPU s | GPU/CPU | GPU peak MB | tensors differing from the CPU's |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    try:
        warm = bench.write_recipe("linear", paths, "gpu")
        run_merge(warm, scratch / "warm", progress=False, card=False, force=True, device="cuda")
        for name, recipe in jobs(paths, methods):
            cpu = run_merge(recipe, scratch / "cpu", progress=False, card=False, force=True)
            torch.cuda.reset_peak_memory_stats()
            gpu = run_merge(recipe, scratch / "gpu", progress=False, card=False, force=True, device="cuda")
            peak = torch.cuda.max_memory_allocated() / 2**20
            differ, count = same_bytes(tensors(scratch / "cpu"), tensors(scratch / "gpu"))
            line = (f"| {name} | {cpu['seconds']:.2f} | {gpu['seconds']:.2f} | {gpu['seconds'] / cpu['seconds']:.3f} | "
                    f"{peak:.0f} | {differ} of {count} |")
            lines.append(line)
            print(line, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
