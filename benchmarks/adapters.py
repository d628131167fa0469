"""The module plane side by side with PEFT: training step, activation memory, inject + load time.

Jobs (each tool in its own process, one after the other; the driver imports no torch, so each
child's ru_maxrss is its own peak RSS):

- step: LoRA r=16, alpha 32, on every linear layer of a Llama-shaped model (hidden 512, 4 layers,
  intermediate 1376, vocab 8000, float32), batch 4 × 128 tokens, causal-LM loss, AdamW; 3 warm-up
  steps, then the median of 10 timed forward + backward + optimizer steps. Peak RSS of the process.
- activations: bytes of the tensors autograd keeps for the backward pass (counted once per storage
  through `torch.autograd.graph.saved_tensors_hooks`) for one forward of the same job — LoRA,
  LoRA with A frozen (what PEFT's LoRA-FA optimizer does), and adaptkit's LoRA-FA branch.
- load: a 100-target adapter (hidden 256, 15 layers × 7 linear layers = 105 targets, r=16, saved
  by PEFT): inject time (`get_peft_model` vs `adaptkit.inject`) and load time
  (`PeftModel.from_pretrained` vs `adaptkit.load_adapter`), median of 5, fresh model each time.

    .venv/bin/python benchmarks/adapters.py [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STEP_MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256)
LOAD_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=15, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=8000, max_position_embeddings=256)


def build(config: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config))


def attach(tool: str, model, variant: str = "lora"):
    """The adapted model and its optimizer parameter groups."""
    if tool == "peft":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if variant == "lora_frozen_a":
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
        return peft_model, [{"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": 1e-4}]
    import adaptkit as ak

    handle = ak.inject(model, variant, r=16, lora_alpha=32, target_modules="all-linear")
    return model, handle.param_groups(1e-4)


def job_step(tool: str, variant: str, steps: int) -> dict:
    import resource

    import torch

    torch.manual_seed(1)
    model, groups = attach(tool, build(STEP_MODEL), variant)
    model.train()
    opt = torch.optim.AdamW(groups)
    ids = torch.randint(0, STEP_MODEL["vocab_size"], (4, 128))
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return {"step_s": statistics.median(times), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "saved_mb": sum(saved.values()) / 2**20, "loss": float(loss)}


def job_load(tool: str, folder: str, repeats: int = 5) -> dict:
    import copy

    base = build(LOAD_MODEL)
    inject_s, load_s = [], []
    for _ in range(repeats):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        attach(tool, model)
        inject_s.append(time.perf_counter() - start)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if tool == "peft":
            from peft import PeftModel

            PeftModel.from_pretrained(model, folder)
        else:
            import adaptkit as ak

            ak.load_adapter(model, folder)
        load_s.append(time.perf_counter() - start)
    return {"inject_s": statistics.median(inject_s), "load_s": statistics.median(load_s)}


def make_adapter(folder: str) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(LOAD_MODEL), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                         init_lora_weights=False))
    model.save_pretrained(folder)
    return sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))


def child(args: list[str]) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT.parent)
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = job_step(rest[0], rest[1], int(rest[2])) if kind == "step" else job_load(rest[0], rest[1])
        print(json.dumps(result))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; step job: r=16 all-linear, Llama {STEP_MODEL}, "
          "batch 4 × 128, float32")
    rows = {}
    for tool, variant in (("peft", "lora"), ("adaptkit", "lora"), ("peft", "lora_frozen_a"), ("adaptkit", "lora_fa")):
        rows[(tool, variant)] = child(["step", tool, variant, str(args.steps)])
        r = rows[(tool, variant)]
        print(f"  {tool:8s} {variant:14s} step {r['step_s'] * 1000:7.1f} ms  peak {r['peak_mb']:7.0f} MB  "
              f"saved for backward {r['saved_mb']:7.1f} MB  loss {r['loss']:.4f}", flush=True)
    p, a = rows[("peft", "lora")], rows[("adaptkit", "lora")]
    print("\n| job | PEFT | adaptkit | ratio (target) |\n|---|---|---|---|")
    print(f"| LoRA r=16 step, ms | {p['step_s'] * 1000:.1f} | {a['step_s'] * 1000:.1f} | "
          f"{a['step_s'] / p['step_s']:.3f} (≤ 1.0) {'✓' if a['step_s'] <= p['step_s'] else '✗'} |")
    print(f"| LoRA r=16 peak RSS, MB | {p['peak_mb']:.0f} | {a['peak_mb']:.0f} | "
          f"{a['peak_mb'] / p['peak_mb']:.3f} (≤ 1.0) {'✓' if a['peak_mb'] <= p['peak_mb'] else '✗'} |")
    fa, frozen = rows[("adaptkit", "lora_fa")], rows[("peft", "lora_frozen_a")]
    print(f"| saved for backward, MB: LoRA / LoRA-FA | {p['saved_mb']:.1f} (A frozen: {frozen['saved_mb']:.1f}) | "
          f"{a['saved_mb']:.1f} / {fa['saved_mb']:.1f} | LoRA-FA / LoRA {fa['saved_mb'] / a['saved_mb']:.3f} |")
    print(f"| LoRA-FA step, ms | {frozen['step_s'] * 1000:.1f} (A frozen) | {fa['step_s'] * 1000:.1f} | "
          f"{fa['step_s'] / frozen['step_s']:.3f} |")
    with tempfile.TemporaryDirectory() as tmp:
        targets = _setup(tmp)
        lp, la = child(["load", "peft", tmp]), child(["load", "adaptkit", tmp])
    print(f"| inject {targets} targets, ms | {lp['inject_s'] * 1000:.1f} | {la['inject_s'] * 1000:.1f} | "
          f"{la['inject_s'] / lp['inject_s']:.3f} |")
    print(f"| load {targets}-target adapter, ms | {lp['load_s'] * 1000:.1f} | {la['load_s'] * 1000:.1f} | "
          f"{la['load_s'] / lp['load_s']:.3f} |")


def _setup(folder: str) -> int:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import adapters; print(adapters.make_adapter({folder!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
