"""QLoRA on a CUDA GPU: adaptkit's `QuantizedLinear` against bitsandbytes' `Linear4bit`.

Checks, on the GPU, that the NF4 (and double-quantized) codes bitsandbytes' CUDA kernel stores are
the codes adaptkit stores, that a layer's output and input gradient agree, and times one
forward + backward of a 4096 × 4096 layer on 8 × 512 tokens (bf16; median of 20 after 5 warm-ups)
and the peak GPU memory of each. Needs a GPU and bitsandbytes.

    python benchmarks/gpu_qlora.py
"""
from __future__ import annotations

import statistics

import torch


def timed(fn, runs: int = 20) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    from adaptkit import registry
    from adaptkit.quant.quantized import QuantizedLinear

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    torch.manual_seed(0)
    for name, double in (("nf4", False), ("nf4_dq", True)):
        w = torch.randn(4096, 4096, dtype=torch.bfloat16)
        ours = registry.get("quantizer", name).quantize(w)
        packed, state = F.quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4", compress_statistics=double)
        theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        same = {k: torch.equal(ours[k], theirs[k].cpu()) for k in theirs if k in ours}
        differ = {k: (ours[k].int() != theirs[k].cpu().int()).float().mean().item() for k, v in same.items() if not v}
        print(f"{name}: codes equal to bitsandbytes' CUDA kernel: {all(same.values())} "
              f"(fraction differing per key: {differ or 'none'})")

    w = torch.randn(4096, 4096, dtype=torch.bfloat16) * 0.02
    mine = QuantizedLinear.from_weight("nf4", w).cuda()
    theirs = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
    theirs = theirs.cuda()
    x = torch.randn(8, 512, 4096, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    a = mine(x)
    b = theirs(x)
    print(f"forward max |Δ| vs bitsandbytes: {(a - b).abs().max().item():.4g} (output scale {b.abs().max().item():.3g})")
    ga, = torch.autograd.grad(a.sum(), x)
    gb, = torch.autograd.grad(b.sum(), x)
    print(f"input-gradient max |Δ|: {(ga - gb).abs().max().item():.4g} (scale {gb.abs().max().item():.3g})")

    rows = []
    for label, layer in (("bitsandbytes Linear4bit", theirs), ("adaptkit QuantizedLinear", mine)):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = timed(lambda: layer(x).sum().backward())
        rows.append((label, ms, (torch.cuda.max_memory_allocated() - base) / 2**20))
    dense = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows.append(("bf16 nn.Linear (no quantization)", timed(lambda: dense(x).sum().backward()),
                 (torch.cuda.max_memory_allocated() - base) / 2**20))
    print("\n| layer 4096×4096, 8×512 tokens, fwd+bwd | ms (median of 20) | peak extra GPU MB |\n|---|---|---|")
    for label, ms, mb in rows:
        print(f"| {label} | {ms:.3f} | {mb:.0f} |")
    print(f"\ntime ratio adaptkit / bitsandbytes: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
