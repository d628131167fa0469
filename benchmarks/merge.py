"""`adaptkit merge` side by side with mergekit (models -> model) and PEFT (base + LoRA -> model).

Each job runs as its own process, one tool after the other on the same inputs (already in the page
cache). The tools run through their own entry points, `mergekit.scripts.run_yaml:main` (what
`mergekit-yaml RECIPE OUT --no-write-model-card --no-copy-tokenizer` runs) and `adaptkit.cli:main`
(`adaptkit --quiet merge RECIPE -o OUT --force`), started as `python -c` so that the process can
stamp the moment its imports are done. Printed per job:

- "s": wall seconds of the whole process (interpreter start and imports included), median of runs;
- "work s": seconds after the tool's imports (torch, transformers, ...), measured inside the process;
- peak RSS and its ratio, "anon" RSS, and the largest difference between the two outputs.

How memory is measured: a thread polls the process and its children with psutil every 20 ms and
sums their RSS, and RSS minus file-backed/shared pages ("anon"); the command runs under GNU
`/usr/bin/time -f %M`, which reports the kernel's high-water mark (ru_maxrss) of the command. "peak
MB" is the larger of the polled sum and that mark (which also catches spikes shorter than a poll).
GNU time matters: a child started straight from this (large) process would inherit this process's
own high-water mark in its ru_maxrss — Linux carries it across exec. RSS includes file pages
a process has mapped (mergekit memory-maps its inputs; adaptkit reads them with pread), which the
kernel can drop at will; the "anon" column leaves them out (polled, so short spikes can be missed).

Models (built once into benchmarks/_work/merge/, bf16, safetensors via save_pretrained):
  default   Llama-shaped, hidden 1024, 8 layers, intermediate 2816, vocab 32000, untied (≈168M);
            three fine-tunes = base + N(0, 1e-3) noise (seeds 1, 2, 3); a rank-16 all-linear LoRA
            (init_lora_weights=False) saved by PEFT.
  --quick   hidden 512, 2 layers, intermediate 1408, vocab 32000 (≈39M), for a smoke run.
  --scale   also: hidden 2048, 16 layers, intermediate 5632, vocab 32000 (≈953M): base + 3 fine-tunes
            written tensor by tensor with adaptkit's ShardedWriter (~7.6 GB of disk), merged by
            adaptkit with every method (or --methods); target peak RSS < 1.5 GB. --scale-peer: mergekit too.

One recipe per method serves both tools (weights 0.3/0.3/0.4; ties/dare_ties density 0.5;
dtype bfloat16). linear's recipe has no base_model: mergekit makes base_model one more input of
linear and then demands a weight for it (adaptkit does the same since 0feee1f; before, it ignored
base_model for linear).

    .venv/bin/python benchmarks/merge.py [--quick] [--scale [--scale-peer] | --scale-only] [--runs N]
                                         [--code REV]

--code REV benchmarks adaptkit as of a git revision (extracted into _work/), not the working tree
that others may be editing while this runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "merge"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TIME = shutil.which("time", path="/usr/bin:/bin")

SHAPES = {
    "quick": dict(hidden=512, layers=2, intermediate=1408, heads=8, vocab=32000),
    "default": dict(hidden=1024, layers=8, intermediate=2816, heads=16, vocab=32000),
    "scale": dict(hidden=2048, layers=16, intermediate=5632, heads=32, vocab=32000),
}
NOISE = 1e-3  # fine-tune perturbation (base weights are N(0, 0.02))
WEIGHTS = (0.3, 0.3, 0.4)
DENSITY = 0.5
# Every method both tools have: (fine-tunes used, per-model parameters besides the weight, global
# parameters, weights given, with the base). Random methods run with seed 0 in both (not the same draws).
JOBS = {
    "linear": (3, {}, {}, True, False),
    "task_arithmetic": (3, {}, {}, True, True),
    "ties": (3, {"density": DENSITY}, {}, True, True),
    "dare_ties": (3, {"density": DENSITY}, {}, True, True),
    "dare_linear": (3, {"density": DENSITY}, {}, True, True),
    "breadcrumbs": (3, {"density": 0.9, "gamma": 0.01}, {}, True, True),
    "della": (3, {"density": DENSITY, "epsilon": 0.1}, {"lambda": 1.0}, True, True),
    "sce": (3, {}, {"select_topk": 0.5}, False, True),
    "ram": (3, {}, {}, False, True),
    "model_stock": (3, {}, {}, False, True),
    "slerp": (1, {}, {"t": 0.4}, False, "listed"),
    "nuslerp": (2, {}, {}, True, True),
    "multislerp": (3, {}, {}, True, True),
    "karcher": (3, {}, {}, False, False),
    "nearswap": (1, {}, {"t": 0.001}, False, "listed"),
    "arcee_fusion": (1, {}, {}, False, "listed"),
    "passthrough": (1, {}, {}, False, False),
}
METHODS = tuple(JOBS)
RANDOM = {"dare_ties", "dare_linear", "della"}
TIE_BREAK = {"ties", "breadcrumbs", "sce"}  # also run with `tie_break: index` (an adaptkit addition)
# Issue 15's targets: wall ≤ 1/4 of mergekit's for every method (1/10 was the older target for TIES/DARE).
TIME_TARGET = {m: 1 / 4 for m in METHODS}
RSS_TARGET = 1 / 2
SCALE_RSS_TARGET_MB = 1500


# ------------------------------------------------------------------------------------------ models


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], vocab_size=shape["vocab"], tie_word_embeddings=False,
                       max_position_embeddings=2048, torch_dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])  # mergekit needs it in config.json


def done_marker(folder: Path) -> Path:
    return folder / ".built"


def build_with_model(work: Path, shape: dict) -> dict[str, Path]:
    """Base (transformers' own init, bf16) + 3 fine-tunes + a LoRA, each saved with save_pretrained."""
    paths = {"base": work / "base", "ft1": work / "ft1", "ft2": work / "ft2", "ft3": work / "ft3",
             "lora": work / "lora-r16"}
    if all(done_marker(p).exists() for p in paths.values()):
        return paths
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # initialize straight in bf16: no float32 copy of the model
    try:
        model = LlamaForCausalLM(llama_config(shape)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    print(f"building a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama-shaped model "
          f"in {work} ...", flush=True)
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    model.save_pretrained(paths["base"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in (1, 2, 3):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = torch.randn(param.shape, generator=g, dtype=torch.float32).mul_(NOISE)
                param.copy_((base[name].float() + noise).to(torch.bfloat16))
        model.save_pretrained(paths[f"ft{i}"])
        done_marker(paths[f"ft{i}"]).touch()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(base[name])
    del base
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(paths["lora"])
    done_marker(paths["lora"]).touch()
    done_marker(paths["base"]).touch()
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def llama_layout(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    layout = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}"
        layout += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        layout += [(f"{p}.self_attn.{n}.weight", (h, h)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        layout += [(f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                   (f"{p}.mlp.down_proj.weight", (h, f))]
    layout += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return layout


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_streamed(work: Path, shape: dict) -> dict[str, Path]:
    """Base + 3 fine-tunes written tensor by tensor with ShardedWriter: one tensor in memory at a time."""
    paths = {"base": work / "base", "ft1": work / "ft1", "ft2": work / "ft2", "ft3": work / "ft3"}
    config = llama_config(shape).to_json_string()
    if all(done_marker(p).exists() for p in paths.values()):
        for p in paths.values():
            if (p / "config.json").read_text() != config:
                (p / "config.json").write_text(config)
        return paths
    import torch

    from adaptkit.io.outputs import atomic_output
    from adaptkit.io.writer import ShardedWriter

    layout = llama_layout(shape)
    print(f"building a {sum(_numel(s) for _, s in layout) / 1e6:.0f}M-parameter Llama-shaped base + 3 fine-tunes "
          f"(bf16, tensor by tensor) in {work} ...", flush=True)
    t0 = time.perf_counter()
    for key, index in (("base", 0), ("ft1", 1), ("ft2", 2), ("ft3", 3)):
        if done_marker(paths[key]).exists():
            continue
        with atomic_output(paths[key], force=True) as tmp:
            writer = ShardedWriter(tmp, [(name, "BF16", s) for name, s in layout], shard_size="1GB",
                                   metadata={"format": "pt"})
            for name, s in layout:
                if name.endswith("norm.weight"):
                    tensor = torch.ones(s)
                else:
                    tensor = torch.randn(s, generator=torch.Generator().manual_seed(_seed(0, name))).mul_(0.02)
                if index:
                    tensor.add_(torch.randn(s, generator=torch.Generator().manual_seed(_seed(index, name))).mul_(NOISE))
                writer.write(name, tensor.to(torch.bfloat16))
                del tensor
            writer.close()
            (tmp / "config.json").write_text(config)
            done_marker(tmp).touch()
        print(f"  {key} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    return paths


def warm_cache(*folders: Path) -> None:
    """Read every input file once so that neither tool pays the first disk read."""
    for folder in folders:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# --------------------------------------------------------------------------------------- launching

# The end stamp is written by an atexit handler: adaptkit's CLI ends in os._exit after running the
# handlers (it skips torch's interpreter teardown), so a `finally` after main() would never run.
STAMPED = """import atexit, json, os, sys, time
{imports}
_ready = time.time()
def _stamp():
    with open(os.environ["BENCH_STAMPS"], "w") as _f:
        json.dump({{"ready": _ready, "end": time.time()}}, _f)
atexit.register(_stamp)
sys.argv = {argv!r}
{body}
"""


def stamped(imports: str, argv: list[str], body: str) -> list[str]:
    """`python -c` running `body` after `imports`, writing when the imports were done and when it ended."""
    return [sys.executable, "-c", STAMPED.format(imports=imports.strip(), argv=argv, body=body.strip())]


def mergekit_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return stamped("from mergekit.scripts.run_yaml import main",
                   ["mergekit-yaml", str(recipe), str(out), "--no-write-model-card", "--no-copy-tokenizer", *extra],
                   "main()")


HEAVY_IMPORTS = """
try:
    from adaptkit.cli.boundary import heavy_imports
except ImportError:
    from contextlib import nullcontext as heavy_imports
with heavy_imports():
    {modules}
from adaptkit.cli import main
"""


def adaptkit_cmd(*args: str) -> list[str]:
    # adaptkit's CLI imports torch and the merge engine when the merge command runs: import them
    # first so that "work" excludes imports for adaptkit as it does for mergekit (`adaptkit.merge`
    # alone no longer imports torch: before 2026-12-04 adaptkit's "work" included torch's ~1.8 s),
    # as the command imports them (`heavy_imports`: the collector paused; a snapshot older than it
    # imports them plainly).
    return stamped(HEAVY_IMPORTS.format(modules="import adaptkit.merge.engine"), ["adaptkit", "--quiet", *args],
                   "sys.exit(main())")


def peft_cmd(base: Path, adapter: Path, out: Path) -> list[str]:
    return stamped("import torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel", [], f"""
model = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, {str(adapter)!r}).merge_and_unload()
model.save_pretrained({str(out)!r})
""")


def use_snapshot(rev: str) -> str:
    """Run adaptkit as of git `rev`, extracted into _work/ (others edit the working tree meanwhile)."""
    root = ROOT.parent
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    snap = WORK / f"code-{commit}"
    if not (snap / ".done").exists():
        shutil.rmtree(snap, ignore_errors=True)
        snap.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, "adaptkit", "plugins", "registry.toml"], cwd=root,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
        (snap / "plugins").rename(snap / "adaptkit_plugins")  # its registry.toml links to ../registry.toml
        # its C modules (each .c file with a module init), built as the install builds them
        modules = [str(c.relative_to(snap)) for c in sorted(snap.glob("adaptkit_plugins/**/*.c"))
                   if "PyMODINIT_FUNC" in c.read_text()]
        if modules:
            extensions = ", ".join(f"Extension({m[:-2].replace('/', '.')!r}, [{m!r}])" for m in modules)
            subprocess.run([sys.executable, "-c", f"from setuptools import Extension, setup; setup(name='snapshot', "
                            f"ext_modules=[{extensions}], script_args=['-q', 'build_ext', '--inplace'])"],
                           cwd=snap, check=True)
        # Bytecode, as pip compiles an installed package (mergekit's): where PYTHONDONTWRITEBYTECODE is set,
        # every run would otherwise compile the ~45 modules a merge imports again (about 0.1 s).
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(snap)], check=True)
        (snap / ".done").touch()
    ENV["PYTHONPATH"] = str(snap)  # found before the editable install's finder
    sys.path.insert(0, str(snap))  # this process's own imports (adaptkit.io.writer for --scale) too
    where = subprocess.run([sys.executable, "-c", "import adaptkit, adaptkit_plugins, importlib.util, pathlib; "
                            "print(adaptkit.__file__, adaptkit_plugins.__file__, all(importlib.util.find_spec("
                            "'adaptkit_plugins.merges.' + c.stem) for c in pathlib.Path(adaptkit_plugins.__file__)"
                            ".parent.glob('merges/*.c')))"],
                           env=ENV, cwd=WORK, capture_output=True, text=True, check=True).stdout.split()
    if not all(w.startswith(str(snap)) for w in where[:2]):
        raise SystemExit(f"snapshot not picked up: {where}")
    loops = ", its C modules built" if where[2] == "True" and list(snap.glob("adaptkit_plugins/merges/*.c")) else ""
    return f"adaptkit at {commit} (snapshot of that commit in {snap.relative_to(ROOT)}{loops})"


def code_state() -> str:
    """The commit, and a digest of uncommitted changes to the code under test."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT.parent, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    head = git("rev-parse", "--short", "HEAD") or "?"
    changed = git("diff", "HEAD", "--", "adaptkit", "plugins") + git("ls-files", "--others", "--exclude-standard",
                                                                      "adaptkit", "plugins")
    if not changed:
        return f"adaptkit at {head} (working tree, clean)"
    return f"adaptkit at {head} + uncommitted changes (digest {hashlib.sha1(changed.encode()).hexdigest()[:8]})"


# --------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float  # whole process
    work: float  # after the tool's imports (NaN when the process wrote no stamps)
    peak_mb: float  # max(polled tree RSS, ru_maxrss)
    anon_mb: float  # polled tree peak of RSS minus file-backed/shared pages
    maxrss_mb: float  # kernel high-water mark of the command (GNU time)
    polled_mb: float
    children: int
    rc: int
    log: Path
    notes: list[str] = field(default_factory=list)


def measure(cmd: list[str], log: Path, interval: float = 0.02) -> Run:
    """Run `cmd` under GNU time while polling its process tree's RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = {"rss": 0, "anon": 0, "children": 0}
    stop = threading.Event()
    hwm_file, stamps = log.with_suffix(".maxrss"), log.with_suffix(".stamps")
    hwm_file.unlink(missing_ok=True)
    stamps.unlink(missing_ok=True)
    wrapped = [TIME, "-f", "%M", "-o", str(hwm_file), *cmd] if TIME else cmd
    with open(log, "wb") as out:
        start = time.perf_counter()
        # cwd: not the repository root, whose adaptkit/ would shadow a --code snapshot for `python -c`
        proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, env={**ENV, "BENCH_STAMPS": str(stamps)},
                                cwd=WORK)

        def poll() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not stop.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                except psutil.Error:
                    break
                rss = anon = 0
                for p in procs:
                    try:
                        m = p.memory_info()
                    except psutil.Error:
                        continue
                    rss += m.rss
                    anon += m.rss - m.shared
                peak["rss"] = max(peak["rss"], rss)
                peak["anon"] = max(peak["anon"], anon)
                peak["children"] = max(peak["children"], len(procs) - (2 if TIME else 1))
                stop.wait(interval)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = proc.wait()
        seconds = time.perf_counter() - start
        stop.set()
        poller.join()
    maxrss = 0.0
    if TIME:
        try:
            maxrss = int(hwm_file.read_text().split()[-1]) / 1024  # KiB
        except (OSError, ValueError, IndexError):
            pass
    try:
        s = json.loads(stamps.read_text())
        work = s["end"] - s["ready"]
    except (OSError, ValueError, KeyError):
        work = float("nan")
    polled = peak["rss"] / 2**20
    return Run(seconds, work, max(polled, maxrss), peak["anon"] / 2**20, maxrss, polled, peak["children"], rc, log)


def has_weights(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return all((folder / f).exists() for f in set(json.loads(index.read_text())["weight_map"].values()))
    return any(folder.glob("*.safetensors"))


class ToolFailed(Exception):
    pass


def run_tool(name: str, cmd: list[str], out: Path, runs: int) -> Run:
    """`runs` times: median seconds, largest peak. A non-zero exit after all weights were written
    (mergekit's model card offline, DESIGN §11) is noted, not fatal."""
    results = []
    for i in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        # Written-back before the clock starts: the last run's output (336 MB on the default job, often the
        # other tool's) was still being flushed to disk during the next run and slowed its writes by up to
        # 0.3 s (passthrough's work: 0.14 s alone, 0.47 s right after mergekit's run).
        os.sync()
        r = measure(cmd, WORK / "logs" / f"{out.parent.parent.name}-{out.name}.{i}.log")
        if r.rc != 0:
            tail = r.log.read_text(errors="replace")[-600:]
            if not has_weights(out):
                raise ToolFailed(f"{name} failed (exit {r.rc}), no weights in {out}; log {r.log}:\n...{tail}")
            r.notes.append(f"{name} exited {r.rc} after writing the weights (see {r.log})")
        results.append(r)
    best = max(results, key=lambda r: r.peak_mb)
    best.seconds = statistics.median(r.seconds for r in results)
    best.work = statistics.median(r.work for r in results)
    best.notes = sorted({n for r in results for n in r.notes})
    return best


# --------------------------------------------------------------------------------------- outputs


def tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            where.update({k: f for k in h.keys()})
    return where


@dataclass
class Diff:
    max_abs: float = 0.0
    differing: int = 0
    total: int = 0
    worst: str = ""
    max_delta: float = 0.0  # largest |peer − base|, to put max_abs in scale
    mean_delta_peer: float = 0.0
    mean_delta_ours: float = 0.0
    dtypes: set = field(default_factory=set)
    missing: list = field(default_factory=list)

    def text(self) -> str:
        s = (f"max |Δ| {self.max_abs:.3g} ({self.worst or '-'}); {self.differing / max(self.total, 1):.2%} of "
             f"{self.total:,} values differ; largest |peer − base| {self.max_delta:.3g}; mean |out − base| "
             f"peer {self.mean_delta_peer:.3g}, adaptkit {self.mean_delta_ours:.3g}; dtypes {sorted(self.dtypes)}")
        if self.missing:
            s += f"; {len(self.missing)} tensors in only one output (first {self.missing[0]})"
        return s


def compare(peer: Path, ours: Path, base: Path) -> Diff:
    """Tensor-by-tensor comparison of two outputs (their stored values, compared in float32)."""
    from safetensors import safe_open

    a, b, c = tensor_files(peer), tensor_files(ours), tensor_files(base)
    d = Diff(missing=sorted(set(a) ^ set(b)))
    handles: dict[Path, object] = {}

    def get(where: dict[str, Path], name: str):
        f = where[name]
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        return handles[f].get_tensor(name)

    sum_peer = sum_ours = 0.0
    for name in sorted(set(a) & set(b)):
        x, y = get(a, name), get(b, name)
        d.dtypes |= {str(x.dtype).removeprefix("torch."), str(y.dtype).removeprefix("torch.")}
        x, y = x.float(), y.float()
        diff = (x - y).abs()
        m = float(diff.max()) if diff.numel() else 0.0
        if m > d.max_abs:
            d.max_abs, d.worst = m, name
        d.differing += int((diff > 0).sum())
        d.total += diff.numel()
        if name in c:
            z = get(c, name).float()
            dp, do = (x - z).abs(), (y - z).abs()
            d.max_delta = max(d.max_delta, float(dp.max()))
            sum_peer += float(dp.double().sum())
            sum_ours += float(do.double().sum())
    d.mean_delta_peer = sum_peer / max(d.total, 1)
    d.mean_delta_ours = sum_ours / max(d.total, 1)
    return d


# --------------------------------------------------------------------------------------- jobs


def recipe_text(method: str, paths: dict[str, Path]) -> str:
    count, own, shared, weighted, base = JOBS[method]
    lines = ["models:"]
    if base == "listed":  # slerp, nearswap, arcee_fusion: the base and one model, as mergekit's examples write them
        lines.append(f"  - model: {paths['base']}")
    for i, w in zip(range(1, count + 1), WEIGHTS):
        params = {**({"weight": w} if weighted else {}), **own}
        lines.append(f"  - model: {paths[f'ft{i}']}")
        if params:
            lines += ["    parameters:"] + [f"      {k}: {v}" for k, v in params.items()]
    if base:  # linear's recipe has none: see the module docstring
        lines.append(f"base_model: {paths['base']}")
    if shared:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in shared.items()]
    return "\n".join(lines + [f"merge_method: {method}", "dtype: bfloat16", ""])


def write_recipe(method: str, paths: dict[str, Path], tag: str) -> Path:
    recipe = WORK / tag / "recipes" / f"{method}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(recipe_text(method, paths))
    return recipe


@dataclass
class Row:
    method: str
    peer: Run
    ours: Run
    diff: Diff | None

    @property
    def time_ratio(self) -> float:
        return self.ours.seconds / self.peer.seconds

    @property
    def work_ratio(self) -> float:
        return self.ours.work / self.peer.work

    @property
    def rss_ratio(self) -> float:
        return self.ours.peak_mb / self.peer.peak_mb


def indexed_recipe(recipe: Path) -> Path:
    """The recipe with `tie_break: index`, under its own `parameters:` block where it has one."""
    indexed, text = recipe.with_name(f"{recipe.stem}-index.yaml"), recipe.read_text()
    indexed.write_text(text.replace("\nparameters:\n", "\nparameters:\n  tie_break: index\n") if "\nparameters:\n" in text
                       else text + "parameters:\n  tie_break: index\n")
    return indexed


def mergekit_job(method: str, paths: dict[str, Path], runs: int, tag: str) -> list[Row]:
    """The method's row; for methods with a magnitude cut also adaptkit with `tie_break: index` against
    the same mergekit run (its max |Δ| is then that of the tied entries kept differently)."""
    recipe = write_recipe(method, paths, tag)
    peer_out, our_out = WORK / tag / "out" / f"mergekit-{method}", WORK / tag / "out" / f"adaptkit-{method}"
    seed = ["--random-seed", "0"] if method in RANDOM else []
    print(f"  {method}: mergekit ...", end="", flush=True)
    peer = run_tool("mergekit", mergekit_cmd(recipe, peer_out, *seed), peer_out, runs)
    print(f" {peer.seconds:.1f} s; adaptkit ...", end="", flush=True)
    ours = run_tool("adaptkit", adaptkit_cmd("merge", str(recipe), "-o", str(our_out), "--force"), our_out, runs)
    print(f" {ours.seconds:.1f} s; comparing ...", flush=True)
    rows = [Row(method, peer, ours, compare(peer_out, our_out, paths["base"]))]
    if method in TIE_BREAK:
        indexed = indexed_recipe(recipe)
        print(f"  {method} (tie_break: index): adaptkit ...", end="", flush=True)
        ours = run_tool("adaptkit", adaptkit_cmd("merge", str(indexed), "-o", str(our_out), "--force"), our_out, runs)
        print(f" {ours.seconds:.1f} s; comparing ...", flush=True)
        rows.append(Row(f"{method} (index)", peer, ours, compare(peer_out, our_out, paths["base"])))
    return rows


def peft_job(paths: dict[str, Path], runs: int, tag: str) -> Row:
    peer_out, our_out = WORK / tag / "out" / "peft-lora", WORK / tag / "out" / "adaptkit-lora"
    print("  LoRA merge-and-unload: peft ...", end="", flush=True)
    peer = run_tool("peft", peft_cmd(paths["base"], paths["lora"], peer_out), peer_out, runs)
    print(f" {peer.seconds:.1f} s; adaptkit ...", end="", flush=True)
    ours = run_tool("adaptkit", adaptkit_cmd("merge", "--base", str(paths["base"]), "-m", str(paths["lora"]),
                                             "-o", str(our_out), "--force"), our_out, runs)
    print(f" {ours.seconds:.1f} s; comparing ...", flush=True)
    return Row("lora (peft)", peer, ours, compare(peer_out, our_out, paths["base"]))


# --------------------------------------------------------------------------------------- printing


def mark(value: float, target: float | None) -> str:
    return "" if target is None else (" ✓" if value <= target else " ✗")


def target_text(target: float | None) -> str:
    return "—" if target is None else f"≤ 1/{round(1 / target)}"


def print_table(title: str, rows: list[Row], peer: str) -> None:
    print(f"\n{title}")
    head = (f"{'method':<16}{peer + ' s':>12}{'adaptkit s':>12}{'time ratio':>13}{'target':>8}"
            f"{'work s peer/ours':>18}{'work ratio':>11}{peer + ' MB':>13}{'adaptkit MB':>13}{'RSS ratio':>12}"
            f"{'anon MB peer/ours':>19}{'max |Δ|':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        tt = TIME_TARGET.get(r.method.split(" ")[0])
        work = f"{r.peer.work:.1f}/{r.ours.work:.1f}"
        print(f"{r.method:<16}{r.peer.seconds:>12.2f}{r.ours.seconds:>12.2f}{r.time_ratio:>11.3f}{mark(r.time_ratio, tt):<2}"
              f"{target_text(tt):>8}{work:>18}{r.work_ratio:>11.3f}{r.peer.peak_mb:>13.0f}{r.ours.peak_mb:>13.0f}"
              f"{r.rss_ratio:>10.3f}{mark(r.rss_ratio, RSS_TARGET):<2}{f'{r.peer.anon_mb:.0f}/{r.ours.anon_mb:.0f}':>19}"
              f"{r.diff.max_abs:>10.3g}")


def details(rows: list[Row], peer: str) -> None:
    for r in rows:
        print(f"  {r.method}: {r.diff.text()}")
        for label, run in ((peer, r.peer), ("adaptkit", r.ours)):
            print(f"    {label}: {run.seconds:.2f} s = {run.seconds - run.work:.2f} startup + {run.work:.2f} work; "
                  f"polled peak {run.polled_mb:.0f} MB, ru_maxrss {run.maxrss_mb:.0f} MB, anon {run.anon_mb:.0f} MB, "
                  f"children {run.children}, exit {run.rc}" + (f"; {'; '.join(run.notes)}" if run.notes else ""))


def markdown(rows: list[Row], peer: str) -> list[str]:
    out = [f"| method | {peer} s | adaptkit s | time ratio (target) | work s {peer} / adaptkit | work ratio "
           f"| {peer} peak MB | adaptkit peak MB | RSS ratio (target ≤ 1/2) | anon MB {peer} / adaptkit "
           "| max \\|Δ\\| of outputs |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tt = TIME_TARGET.get(r.method.split(" ")[0])
        out.append(f"| {r.method} | {r.peer.seconds:.2f} | {r.ours.seconds:.2f} | {r.time_ratio:.3f} ({target_text(tt)})"
                   f"{mark(r.time_ratio, tt)} | {r.peer.work:.2f} / {r.ours.work:.2f} | {r.work_ratio:.3f} | "
                   f"{r.peer.peak_mb:.0f} | {r.ours.peak_mb:.0f} | {r.rss_ratio:.3f}{mark(r.rss_ratio, RSS_TARGET)} | "
                   f"{r.peer.anon_mb:.0f} / {r.ours.anon_mb:.0f} | {r.diff.max_abs:.3g} |")
    return out


# --------------------------------------------------------------------------------------- main


def compare_tools(args, md: list[str]) -> None:
    tag = "quick" if args.quick else "default"
    shape = SHAPES[tag]
    paths = build_with_model(WORK / tag / "models", shape)
    size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e6
    warm_cache(*paths.values())
    print(f"\nmodel: {tag} {shape}, bf16, base {size:.0f} MB; weights {WEIGHTS}, density {DENSITY}; "
          f"{args.runs} run(s) per job")
    rows, failures = [], []
    for m in args.methods.split(",") if args.methods else METHODS:
        try:
            rows.extend(mergekit_job(m, paths, args.runs, tag))
        except ToolFailed as e:
            print(f"\n  FAILED {m}: {e}", flush=True)
            failures.append(f"{m}: {str(e).splitlines()[0]}")
    lora = []
    try:
        lora.append(peft_job(paths, args.runs, tag))
    except ToolFailed as e:
        print(f"\n  FAILED LoRA merge: {e}", flush=True)
        failures.append(f"lora: {str(e).splitlines()[0]}")
    print_table("models -> model: adaptkit vs mergekit (ratios = adaptkit / mergekit)", rows, "mergekit")
    details(rows, "mergekit")
    print_table("base + LoRA r16 (all-linear) -> model: adaptkit vs PEFT merge_and_unload", lora, "peft")
    details(lora, "peft")
    md += [f"### {tag} model: Llama-shaped {shape}, bf16, {size:.0f} MB per input", "",
           *markdown(rows, "mergekit"), "", *markdown(lora, "peft"), ""]
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        md += ["Failed: " + "; ".join(failures), ""]


def scale(args, md: list[str]) -> None:
    shape = SHAPES["scale"]
    paths = build_streamed(WORK / "scale" / "models", shape)
    size = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e9
    print(f"\nscale model: {shape}, bf16, {size:.2f} GB per input (base + 3 fine-tunes)")
    warm_cache(*paths.values())
    found = []
    # "sce (index)": SCE with tie_break: index (adaptkit only), run after "sce" for each method of TIE_BREAK
    picked = args.methods.split(",") if args.methods else METHODS
    for method in [m for name in picked for m in ([name, f"{name} (index)"] if name in TIE_BREAK else [name])]:
        plain = method.removesuffix(" (index)")
        recipe = write_recipe(plain, paths, "scale")
        recipe = indexed_recipe(recipe) if method != plain else recipe
        out = WORK / "scale" / "out" / f"adaptkit-{plain}"
        print(f"  {method}: adaptkit ...", end="", flush=True)
        try:
            ours = run_tool("adaptkit", adaptkit_cmd("merge", str(recipe), "-o", str(out), "--force"), out, 1)
        except ToolFailed as e:
            print(f"\n  FAILED {method}: {e}", flush=True)
            md.append(f"Failed at scale: {method}: {str(e).splitlines()[0]}")
            continue
        print(f" {ours.seconds:.1f} s", end="", flush=True)
        peer, diff = None, None
        if args.scale_peer and method == plain:
            peer_out = WORK / "scale" / "out" / f"mergekit-{method}"
            print("; mergekit ...", end="", flush=True)
            try:
                peer = run_tool("mergekit", mergekit_cmd(recipe, peer_out), peer_out, 1)
                print(f" {peer.seconds:.1f} s; comparing ...", end="", flush=True)
                diff = compare(peer_out, out, paths["base"])
            except ToolFailed as e:
                print(f"\n  FAILED mergekit {method}: {e}", flush=True)
            shutil.rmtree(peer_out, ignore_errors=True)
        print(flush=True)
        found.append((method, ours, peer, diff))
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n~1B model ({size:.2f} GB per input, 4 inputs): adaptkit peak RSS (target < {SCALE_RSS_TARGET_MB} MB)")
    head = (f"{'method':<16}{'adaptkit s':>11}{'work s':>8}{'peak MB':>9}{'anon MB':>9}{'target':>8}"
            f"{'mergekit s':>12}{'work s':>8}{'peak MB':>9}{'anon MB':>9}{'RSS ratio':>11}{'max |Δ|':>10}")
    print(head)
    print("-" * len(head))
    md += [f"### ~1B model: Llama-shaped {shape}, bf16, {size:.2f} GB per input", "",
           "| method | adaptkit s (work) | adaptkit peak MB | anon MB | target < 1500 MB | mergekit s (work) "
           "| mergekit peak MB | anon MB | RSS ratio | max \\|Δ\\| |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for method, ours, peer, diff in found:
        ok = "✓" if ours.peak_mb < SCALE_RSS_TARGET_MB else "✗"
        if peer:
            ratio = ours.peak_mb / peer.peak_mb
            ps = (f"{peer.seconds:>12.1f}{peer.work:>8.1f}{peer.peak_mb:>9.0f}{peer.anon_mb:>9.0f}{ratio:>11.3f}"
                  f"{diff.max_abs if diff else float('nan'):>10.3g}")
            pm = (f"{peer.seconds:.1f} ({peer.work:.1f}) | {peer.peak_mb:.0f} | {peer.anon_mb:.0f} | {ratio:.3f} | "
                  f"{diff.max_abs if diff else float('nan'):.3g}")
        else:
            ps, pm = "", "— | — | — | — | —"
        print(f"{method:<16}{ours.seconds:>11.1f}{ours.work:>8.1f}{ours.peak_mb:>9.0f}{ours.anon_mb:>9.0f}{ok:>8}{ps}")
        md.append(f"| {method} | {ours.seconds:.1f} ({ours.work:.1f}) | {ours.peak_mb:.0f} | {ours.anon_mb:.0f} | {ok} | {pm} |")
    for method, ours, peer, diff in found:
        print(f"  {method}: adaptkit polled peak {ours.polled_mb:.0f} MB, ru_maxrss {ours.maxrss_mb:.0f} MB"
              + (f"; mergekit polled peak {peer.polled_mb:.0f} MB, ru_maxrss {peer.maxrss_mb:.0f} MB" if peer else "")
              + (f"; {diff.text()}" if diff else ""))
    md.append("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model (2 layers) for a smoke run")
    ap.add_argument("--scale", action="store_true", help="also the ~1B-parameter memory run (~7.6 GB of disk)")
    ap.add_argument("--scale-only", action="store_true", help="only the ~1B-parameter run")
    ap.add_argument("--scale-peer", action="store_true", help="run mergekit on the ~1B model too")
    ap.add_argument("--code", metavar="REV", help="benchmark adaptkit as of this git revision (e.g. HEAD), "
                    "from a snapshot in _work/, instead of the working tree")
    ap.add_argument("--methods", help=f"comma-separated, default all: {','.join(METHODS)}")
    ap.add_argument("--runs", type=int, default=1, help="runs per tool and job (median time, largest peak)")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    state = use_snapshot(args.code) if args.code else code_state()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM;"
          f" {state}")
    print("RSS: process tree polled every 20 ms + the command's ru_maxrss from GNU time; file-backed pages "
          "included in 'peak', excluded in 'anon'" + ("" if TIME else " (no /usr/bin/time: polling only)"))
    md: list[str] = [f"{state}; {os.cpu_count()} cores; {args.runs} run(s) per job (median time, largest peak)", ""]
    if not args.scale_only:
        compare_tools(args, md)
    if args.scale or args.scale_only:
        scale(args, md)
    end_state = state if args.code else code_state()
    if end_state != state:
        print(f"WARNING: the code under test changed during the run: now {end_state}")
        md.insert(1, f"WARNING: the code changed during the run (ended at {end_state})")
    print("\n--- markdown for benchmarks/RESULTS.md ---\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
