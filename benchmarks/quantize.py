"""NF4 quantization throughput: adaptkit's `nf4` plugin against `bitsandbytes.functional.quantize_4bit`.

Job: every 2-D weight of the 168M Llama-shaped base of benchmarks/merge.py (bf16; built there if
missing), quantized with block size 64, without and with double quantization, by each tool in turn
in one process (tensors read once beforehand; the median of 3 passes per tool). Prints seconds,
parameters per second and the ratio (adaptkit throughput / bitsandbytes throughput; target ≥ 1.0),
and checks that both produce the same codes.

Then peak memory of post-training quantization of the whole model folder, each job in a fresh
process (its own high-water mark, VmHWM: a forked child's ru_maxrss starts at the parent's): `adaptkit quantize --method nf4` (streamed, one tensor at a time) against the usual
bitsandbytes script (safetensors `load_file` of the model, `quantize_4bit` of every matrix,
`save_file` of the result). Target: peak RSS bounded like merges (imports + a few tensors, not
the model), reported as a ratio to the bitsandbytes script.

    .venv/bin/python benchmarks/quantize.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as bench  # noqa: E402


def tensors() -> dict:
    from adaptkit.io.store import open_store

    folder = bench.WORK / "default" / "models" / "base"
    if not bench.has_weights(folder):
        bench.build_with_model(bench.WORK / "default" / "models", bench.SHAPES["default"])
    store = open_store(folder)
    return {k: store.get(k) for k in store.keys() if k.endswith(".weight") and len(store.info(k).shape) == 2}


def timed(fn, weights: dict, passes: int = 3) -> float:
    runs = []
    for _ in range(passes):
        start = time.perf_counter()
        for w in weights.values():
            fn(w)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    import torch
    from bitsandbytes import functional as bnb

    from adaptkit import registry

    warnings.filterwarnings("ignore")
    weights = tensors()
    params = sum(w.numel() for w in weights.values())
    print(f"{len(weights)} matrices, {params / 1e6:.1f}M parameters (bf16); torch threads {torch.get_num_threads()}")
    print("\n| job | bitsandbytes s | adaptkit s | throughput ratio (target ≥ 1.0) |\n|---|---|---|---|")
    for name, double in (("nf4", False), ("nf4_dq", True)):
        ours = registry.get("quantizer", name)
        sample = next(iter(weights.values()))
        packed, _ = bnb.quantize_4bit(sample, blocksize=64, quant_type="nf4", compress_statistics=double)
        assert torch.equal(ours.quantize(sample)["weight"].reshape(-1), packed.reshape(-1)), "codes differ"
        theirs_s = timed(lambda w: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double), weights)
        ours_s = timed(ours.quantize, weights)
        ratio = theirs_s / ours_s
        print(f"| {name} ({params / 1e6:.0f}M params) | {theirs_s:.2f} | {ours_s:.2f} | "
              f"{ratio:.2f} {'✓' if ratio >= 1 else '✗'} |", flush=True)


PTQ_JOBS = {
    "bitsandbytes script": """
import sys, torch
from safetensors.torch import load_file, save_file
from bitsandbytes import functional as F
weights = load_file(sys.argv[1] + "/model.safetensors")
out = {}
for name, w in weights.items():
    if name.endswith(".weight") and w.dim() == 2:
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        out[name] = packed
        out.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    else:
        out[name] = w
save_file(out, sys.argv[2] + "/model.safetensors")
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
""",
    "adaptkit quantize": """
import shutil, sys
from adaptkit.quant.quantize import run_quantize
shutil.rmtree(sys.argv[2])
run_quantize(sys.argv[1], "nf4", sys.argv[2], progress=False)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
""",
}


def ptq_memory() -> None:
    import tempfile

    folder = bench.WORK / "default" / "models" / "base"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    rows = {}
    for name, code in PTQ_JOBS.items():
        with tempfile.TemporaryDirectory(dir=bench.WORK) as out:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code, str(folder), out], capture_output=True, text=True, check=True)
            rows[name] = (float(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start)
    print(f"\nPTQ of the whole folder ({size:.0f} MB bf16) to NF4, fresh process each:\n")
    print("| job | peak RSS MB | wall s |\n|---|---|---|")
    for name, (peak, seconds) in rows.items():
        print(f"| {name} | {peak:.0f} | {seconds:.1f} |")
    ratio = rows["adaptkit quantize"][0] / rows["bitsandbytes script"][0]
    print(f"\npeak RSS ratio adaptkit / bitsandbytes script: {ratio:.2f}")


if __name__ == "__main__":
    main()
    ptq_memory()
