"""`adaptkit inspect` on a 1 GB sharded model: wall time of the whole command, interpreter start included.

The model is written once into benchmarks/_work/ (Llama-shaped names, float32, 500 MB shards).
Printed: the time of `python -c pass` (the floor), of `adaptkit inspect`, and of loading the same
figures the usual way (transformers' AutoConfig + safetensors safe_open over every shard).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).parent / "_work" / "sharded-1gb"


def build() -> None:
    if (WORK / "model.safetensors.index.json").exists():
        return
    import torch

    from adaptkit.io.writer import atomic_output, save_tensors

    hidden, inter, layers, vocab = 1024, 2816, 15, 32000
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "lm_head.weight": torch.zeros(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{name}.weight"] = torch.zeros(hidden, hidden)
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            tensors[f"{p}.mlp.{name}.weight"] = torch.zeros(shape)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(hidden)
    with atomic_output(WORK, force=True) as tmp:
        save_tensors(tmp, tensors, shard_size="500MB")
        (tmp / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')


def timed(cmd: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


BASELINE = """
import sys, glob
from safetensors import safe_open
import torch
n = 0
for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):
    with safe_open(f, 'pt') as h:
        for k in h.keys():
            n += h.get_slice(k).get_shape().numel() if hasattr(h.get_slice(k).get_shape(), 'numel') else __import__('math').prod(h.get_slice(k).get_shape())
print(n)
"""


def main() -> None:
    build()
    size = sum(p.stat().st_size for p in WORK.glob("*.safetensors")) / 1e9
    floor = timed([sys.executable, "-c", "pass"])
    ours = timed([sys.executable, "-m", "adaptkit", "inspect", str(WORK), "--json"])
    naive = timed([sys.executable, "-c", BASELINE, str(WORK)])
    print(f"model: {size:.2f} GB in {len(list(WORK.glob('*.safetensors')))} shards")
    print(f"{'job':<44}{'wall s':>8}")
    print(f"{'python -c pass (interpreter start)':<44}{floor:>8.3f}")
    print(f"{'adaptkit inspect --json':<44}{ours:>8.3f}")
    print(f"{'safetensors safe_open + torch (usual way)':<44}{naive:>8.3f}")
    print(f"adaptkit after interpreter start: {ours - floor:.3f} s; ratio to the usual way: {ours / naive:.2f}")


if __name__ == "__main__":
    main()
