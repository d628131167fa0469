"""QLoRA training memory: LoRA on a 4-bit (NF4) base against LoRA on the same base in bfloat16.

Job: a Llama-shaped model (hidden 1024, 8 layers, intermediate 2816, vocab 8000, untied; 117M
parameters, bf16), `adaptkit.train.train` with LoRA r=16 on all linear layers, bf16 autocast,
batch 2 × 64 tokens, 2 optimizer steps (bf16 matmuls are slow on CPUs without bf16 units);
each configuration in a fresh process. A baseline
process does everything but build the model (imports, tokenizer, data). Prints peak RSS and the
share of it the base weights take:

    weights' share = peak RSS − (bf16 run's peak RSS − the bf16 weights' bytes)

i.e. everything that is not base weights is taken to cost the same in both runs (it is the same
adapter, optimizer, batch and code). Target: QLoRA's share ≤ 0.5 of the bf16 weights' bytes.

    .venv/bin/python benchmarks/qlora.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "qlora"
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=8000, tie_word_embeddings=False)
CONFIGS = {
    "baseline (no model)": None,
    "LoRA, bf16 base": {},
    "QLoRA, nf4 base": {"quantize": "nf4"},
    "QLoRA, nf4 + double quant": {"quantize": "nf4_dq"},
}


def build() -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from text_models import counting, save_tokenizer, write_jsonl

    base, data = WORK / "base", WORK / "train.jsonl"
    if not (base / "model.safetensors").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, max_position_embeddings=256)).to(torch.bfloat16)
        model.save_pretrained(base)
        save_tokenizer(base)
    write_jsonl(data, counting(n=32, length=62))
    return base, data


def child(base: str, data: str, config: str) -> None:
    """One configuration; prints a JSON line with peak RSS (MB) and seconds."""
    settings = json.loads(config)
    start = time.perf_counter()
    from adaptkit import allocator
    from adaptkit.train.data import load_dataset
    from adaptkit.train.models import load_tokenizer
    from adaptkit.train.loop import train  # the baseline makes the same imports as a training run

    if settings is None:
        load_dataset(data, load_tokenizer(Path(base)), max_length=64)
    else:
        with allocator.tuning():  # malloc tuned as `adaptkit train` has it (allocator.py)
            train(base, "lora", data, WORK / "out", settings={"r": 16, "lora_alpha": 32}, max_steps=2,
                  batch_size=2, max_length=64, precision="bf16", base_dtype="bfloat16", force=True, progress=False,
                  **settings)
    import torch

    # VmHWM is this process's own high-water mark (a forked child's ru_maxrss starts at the parent's)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"peak_mb": peak, "gpu_mb": gpu, "seconds": time.perf_counter() - start}))


def main() -> None:
    base, data = build()
    from adaptkit.io.store import open_store

    with open_store(base) as store:
        weights = sum(store.info(k).nbytes for k in store.keys()) / 2**20
        params = sum(store.info(k).numel for k in store.keys())
        linear = sum(store.info(k).numel for k in store.keys() if k.endswith("proj.weight"))
    print(f"base: {params / 1e6:.0f}M parameters, {weights:.0f} MB in bf16 ({linear / params:.0%} in the "
          "quantized linear layers; embeddings and LM head stay bf16)")
    results = {}
    for name, settings in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--child", str(base), str(data), json.dumps(settings)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    for memory, label in (("peak_mb", "peak RSS"), ("gpu_mb", "peak GPU memory")):
        if results["LoRA, bf16 base"][memory] is None:
            continue
        rest = results["LoRA, bf16 base"][memory] - weights
        print(f"\n| run | {label} MB | seconds | base weights' share MB | share / bf16 weights (target ≤ 0.5) |")
        print("|---|---|---|---|---|")
        for name, r in results.items():
            if CONFIGS[name] is None:
                print(f"| {name} | {r[memory]:.0f} | {r['seconds']:.1f} | – | – |")
                continue
            share = r[memory] - rest
            ratio = share / weights
            mark = "" if not CONFIGS[name] else (" ✓" if ratio <= 0.5 else " ✗")
            print(f"| {name} | {r[memory]:.0f} | {r['seconds']:.1f} | {share:.0f} | {ratio:.2f}{mark} |")
        q = results["QLoRA, nf4 base"][memory] / results["LoRA, bf16 base"][memory]
        print(f"\n{label} ratio QLoRA nf4 / LoRA bf16: {q:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
