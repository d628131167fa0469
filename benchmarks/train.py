"""Training speed and memory against PEFT + transformers' Trainer, on the same job side by side.

Job (issue 18): LoRA r=16, alpha 32, on all linear layers of a 168M-parameter Llama built from a
config (hidden 768, 12 layers, intermediate 3072, vocab 36000, untied; float32 weights), batches of
4 × 128 tokens, AdamW at lr 1e-4 with a cosine schedule and clipping at 1.0, in fp32 and bf16
(autocast). Each run is a fresh process; the first optimizer step is a warm-up and is not timed.
Printed per run: tokens/s over the timed steps, peak RSS (VmHWM), its growth during training (peak
RSS minus the RSS just before the first step: activations, gradients, optimizer state, the loss over
the vocabulary, malloc's slack) and the activation memory itself, counted exactly: the bytes autograd
saves for the backward pass in a step (`SavedForBackward`). Ratios are adaptkit / PEFT (targets:
tokens/s ≥ 1.2×, peak ≤ 1.0×) and, for `--gradient-checkpointing`, activations with / without it
(target ≤ 0.5×). `--qlora` adds the 4-bit NF4 base on both sides (PEFT through
bitsandbytes; reported as n/a where bitsandbytes cannot run here).

    .venv/bin/python benchmarks/train.py [--steps 6] [--qlora] [--repeat 3] [--only adaptkit-fp32,peft-fp32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "train"
SHAPE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=36000, tie_word_embeddings=False, max_position_embeddings=256)
BATCH, TOKENS, LR, R = 4, 128, 1e-4, 16
# run -> (tool, precision, gradient checkpointing, quantize)
RUNS = {
    "peft-fp32": ("peft", "fp32", False, None), "adaptkit-fp32": ("adaptkit", "fp32", False, None),
    "peft-bf16": ("peft", "bf16", False, None), "adaptkit-bf16": ("adaptkit", "bf16", False, None),
    "peft-fp32-gc": ("peft", "fp32", True, None), "adaptkit-fp32-gc": ("adaptkit", "fp32", True, None),
}
QLORA = {"peft-nf4": ("peft", "bf16", False, "nf4"), "adaptkit-nf4": ("adaptkit", "bf16", False, "nf4")}


def build() -> tuple[Path, Path]:
    """The base folder (config-built Llama, word tokenizer) and 4 × `steps`-plenty JSON lines of 128 tokens."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from text_models import counting, save_tokenizer, write_jsonl

    base, data = WORK / "base", WORK / "train.jsonl"
    if not (base / "model.safetensors").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(base)
        save_tokenizer(base)
    write_jsonl(data, counting(n=256, length=TOKENS))  # <s> + 128 words, truncated to 128 tokens
    return base, data


def rss_mb(field: str) -> float:
    """This process's VmRSS or VmHWM (its own high-water mark) in MB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


class SavedForBackward:
    """Activation memory counted exactly: the bytes of the tensors autograd saves for the backward pass
    in one step (each storage once; the model's own parameters are not activations), the most over the
    steps. Tensors a checkpointed block recomputes are saved by its own hooks, so they do not count."""

    def __init__(self):
        self.weights: set[int] = set()
        self.seen: set[int] = set()
        self.step = self.peak = 0

    def start(self, model) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.next_step()

    def next_step(self) -> None:
        self.peak, self.step, self.seen = max(self.peak, self.step), 0, set()

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.weights and key not in self.seen:
            self.seen.add(key)
            self.step += storage.nbytes()
        return tensor

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def run_adaptkit(base: str, data: str, steps: int, precision: str, checkpointing: bool, quantize: str | None) -> dict:
    from adaptkit import allocator
    from adaptkit.train.loop import train

    marks, saved = {}, SavedForBackward()

    def clock(view):
        if view.step == 0:
            marks["rss"] = rss_mb("VmRSS")
            saved.start(view.model)
        saved.next_step()
        if view.step in (1, steps):
            marks[view.step] = time.perf_counter()

    with allocator.tuning(), saved.hooks():  # malloc tuned as `adaptkit train` has it
        train(base, "lora", data, WORK / "out", settings={"r": R, "lora_alpha": 2 * R}, max_steps=steps,
              batch_size=BATCH, max_length=TOKENS, lr=LR, precision=precision, gradient_checkpointing=checkpointing,
              quantize=quantize, force=True, progress=False, callback=clock)
    return {"seconds": marks[steps] - marks[1], "before": marks["rss"], "saved": saved.peak}


def run_peft(base: str, data: str, steps: int, precision: str, checkpointing: bool, quantize: str | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line)["text"] for line in open(data)]
    encoded = tokenizer(rows, truncation=True, max_length=TOKENS, padding="max_length", return_tensors="pt")
    examples = [{"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
                for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    options = {}
    if quantize:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **options)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", task_type="CAUSAL_LM"))
    marks, saved = {}, SavedForBackward()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["rss"] = rss_mb("VmRSS")
            saved.start(model)

        def on_step_end(self, args, state, control, **kwargs):
            saved.next_step()
            if state.global_step in (1, steps):
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(str(WORK / "peft-out"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="cosine", max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=True,
                             gradient_checkpointing=checkpointing, report_to=[], save_strategy="no",
                             logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    with saved.hooks():
        Trainer(model=model, args=args, train_dataset=examples, callbacks=[Clock()]).train()
    return {"seconds": marks[steps] - marks[1], "before": marks["rss"], "saved": saved.peak}


def child(name: str, base: str, data: str, steps: int) -> None:
    tool, precision, checkpointing, quantize = {**RUNS, **QLORA}[name]
    result = (run_adaptkit if tool == "adaptkit" else run_peft)(base, data, steps, precision, checkpointing, quantize)
    peak = rss_mb("VmHWM")
    print(json.dumps({"tokens_per_s": (steps - 1) * BATCH * TOKENS / result["seconds"], "peak_mb": peak,
                      "activations_mb": peak - result["before"], "saved_mb": result["saved"] / 2**20}))


def median(found: list[dict]) -> dict:
    """Each number's median over the rounds (the first error where a round failed)."""
    failed = [r for r in found if "error" in r]
    if failed:
        return failed[0]
    return {key: statistics.median(r[key] for r in found) for key in found[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--qlora", action="store_true", help="also the NF4 base (PEFT through bitsandbytes)")
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every run, interleaved (a shared machine's speed drifts); medians reported")
    a = parser.parse_args()
    base, data = build()
    runs = {**RUNS, **(QLORA if a.qlora else {})}
    picked = a.only.split(",") if a.only else list(runs)
    rounds: dict[str, list[dict]] = {name: [] for name in picked}
    for _ in range(a.repeat):
        for name in picked:
            done = subprocess.run([sys.executable, __file__, "--child", name, str(base), str(data), str(a.steps)],
                                  capture_output=True, text=True)
            last = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
            rounds[name].append(json.loads(last[0]) if last else
                                {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:80]})
            print(name, rounds[name][-1], file=sys.stderr)
    results = {name: median(found) for name, found in rounds.items()}
    print(f"\n{BATCH}×{TOKENS} tokens, LoRA r{R} all-linear, 168M Llama, {a.steps - 1} timed steps, CPU, "
          f"median of {a.repeat} interleaved round(s)\n")
    print("| run | tokens/s | peak RSS MB | RSS growth in training MB | saved for backward MB | tokens/s vs PEFT "
          "| peak vs PEFT |")
    print("|---|---|---|---|---|---|---|")
    for name in picked:
        r = results[name]
        if "error" in r:
            print(f"| {name} | n/a ({r['error']}) | | | | | |")
            continue
        peer = results.get(name.replace("adaptkit", "peft"), {})
        vs = (f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}× | {r['peak_mb'] / peer['peak_mb']:.2f}×"
              if name.startswith("adaptkit") and "tokens_per_s" in peer else "– | –")
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {r['activations_mb']:.0f} | "
              f"{r['saved_mb']:.0f} | {vs} |")
    for tool in ("adaptkit", "peft"):
        on, off = results.get(f"{tool}-fp32-gc", {}), results.get(f"{tool}-fp32", {})
        if "saved_mb" in on and "saved_mb" in off:
            print(f"\n{tool}, fp32, with / without gradient checkpointing: activations saved for backward "
                  f"{on['saved_mb'] / off['saved_mb']:.2f}× (target ≤ 0.5×), RSS growth in training "
                  f"{on['activations_mb'] / off['activations_mb']:.2f}×")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
