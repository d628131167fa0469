"""PEFT's own test matrix run through adaptkit, PEFT as the oracle.

Cases (`_peft_models.py`): every row of TEST_CASES in PEFT's tests/test_custom_models.py on its small
model, and every config of tests/test_decoder_models.py on tiny OPT, GPT-2, GPT-J, Llama, Qwen2 and
Gemma3 decoders. A row whose config class the installed PEFT lacks is skipped. For each case:

1. PEFT creates the adapter with non-zero weights (PEFT's own `set_init_weights_false` rule; an
   adapter still the identity on the test input gets N(0, 0.1²) added to its trainable parameters),
   saves it, and gives the reference outputs: the adapted model and `merge_and_unload` (where PEFT
   cannot merge, the adapted model is the reference a merge must match);
2. load: `adaptkit.load_adapter` onto the same base, outputs compared;
3. merge: `adaptkit merge` mode 2 (the base saved as safetensors + the adapter -> a model), the
   merged weights loaded into the base, outputs compared with PEFT's merge;
4. reverse: adaptkit saves the adapter it loaded, PEFT loads that folder, outputs compared.

Each stage is `equal` (max |ours − PEFT| ≤ 1e-4 · max |PEFT|), `refused` (an AdaptkitError: its one
line), `FAILED` (any other exception) or `WRONG` (outputs differ without an error: the worst outcome).
The table counts cases by PEFT type × layer kind.

    .venv/bin/python benchmarks/peft_matrix.py [--only SUBSTRING] [--json] [--progress]   # ~1 min on 1 core
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # some PEFT types show progress bars while injecting
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _peft_models import CUSTOM_CASES, DECODER_CONFIGS, DECODERS, IDS, INPUT, Nested, custom_model, decoder  # noqa: E402

TOLERANCE = 1e-4
STAGES = ("load", "merge", "reverse")
# Layer kinds, most specific first: a case is filed under the first kind among its adapted layers.
KINDS = {"ParamWrapper": "target_parameters", "MultiheadAttention": "MHA", "Conv3d": "Conv3d", "Conv2d": "Conv2d",
         "Conv1d": "Conv1d", "Conv1D": "Conv1D (GPT-2)", "Embedding": "Embedding", "Linear": "Linear"}
LORA_FLAVOURS = {"use_dora": "DoRA", "lora_bias": "bias", "kasa_config": "KaSA", "velora_config": "VeLoRA",
                 "monteclora_config": "MonteCLoRA", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
                 "trainable_token_indices": "tokens", "target_parameters": "params"}


class Case:
    """One row: a name, a base builder, a PEFT config class name and its kwargs, the input."""

    def __init__(self, name: str, model: str, config_cls: str, kwargs: dict, family: str | None = None):
        self.name, self.model, self.config_cls, self.kwargs, self.family = name, model, config_cls, kwargs, family

    def base(self) -> torch.nn.Module:
        return decoder(self.family) if self.family else custom_model(self.model)

    def run(self, model: torch.nn.Module) -> torch.Tensor:
        """The outputs; a decoder's logits at the input tokens (prompt learning prepends virtual ones)."""
        with torch.no_grad():
            return model(IDS).logits[:, -IDS.shape[1]:] if self.family else model(INPUT)


def all_cases(only: str | None = None) -> list[Case]:
    """The matrix, less rows whose config class the installed PEFT lacks; `only` filters by name."""
    import peft

    rows = [Case(name, model, cls, kwargs) for name, model, cls, kwargs in CUSTOM_CASES]
    for family in DECODERS:
        seen: Counter = Counter()
        for cls, kwargs in DECODER_CONFIGS:
            seen[cls] += 1
            rows.append(Case(f"{family} {cls} {seen[cls]}", family, cls, kwargs, family=family))
    return [c for c in rows if hasattr(peft, c.config_cls) and (only is None or only.lower() in c.name.lower())]


def peft_config(case: Case):
    """The case's PEFT config with non-zero initial weights, as PEFT's `set_init_weights_false` sets them."""
    import peft

    def build(value):
        return getattr(peft, value.cls)(**value.kwargs) if isinstance(value, Nested) else value

    cls = getattr(peft, case.config_cls)
    kwargs = {k: build(v) for k, v in case.kwargs.items()}
    if issubclass(cls, peft.PromptLearningConfig) or cls in (peft.LNTuningConfig, peft.VBLoRAConfig):
        pass
    elif cls is peft.MissConfig and kwargs.get("init_weights") == "bat":
        pass
    elif cls in (peft.LoraConfig, peft.AdaLoraConfig):
        kwargs["init_lora_weights"] = False
    elif cls is peft.IA3Config:
        kwargs["init_ia3_weights"] = False
    elif cls is peft.TinyLoraConfig:
        kwargs["init_weights"] = "uniform"
    else:
        kwargs["init_weights"] = False
    return cls(**kwargs)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def compare(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape:
        return f"WRONG: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    rel = relative(got.float(), want.float())
    return "equal" if rel <= TOLERANCE else f"WRONG: rel {rel:.3g}"


def outcome(error: BaseException, work: Path) -> str:
    """A stage's error as its row entry; the case's scratch folder is written <work>, so rows group."""
    from adaptkit.errors import AdaptkitError

    line = str(error).strip().splitlines()[0].replace(str(work), "<work>") if str(error).strip() else ""
    if isinstance(error, AdaptkitError):
        return f"refused: {line}"
    return f"FAILED: {type(error).__name__}: {line}"[:300]


def layer_kind(peft_model) -> str:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {type(m.get_base_layer()).__name__ if hasattr(m, "get_base_layer") else type(m).__name__
             for m in peft_model.modules() if isinstance(m, BaseTunerLayer)}
    names |= {type(m).__name__ for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"}
    if not names:
        return "prompt" if getattr(peft_model, "peft_config", {}).get("default").is_prompt_learning else "-"
    return next((kind for cls, kind in KINDS.items() if cls in names), "+".join(sorted(names)))


def type_label(config) -> str:
    label = str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type)
    if label == "LORA":
        flavours = [name for key, name in LORA_FLAVOURS.items() if getattr(config, key, None)]
        flavours += ["MiCA"] if getattr(config, "init_lora_weights", None) == "mica" else []
        label += "".join(f"+{f}" for f in flavours)
    return label


def save_base(case: Case, base, folder: Path) -> Path:
    """The base as safetensors (a transformers model through save_pretrained: tied weights once)."""
    if case.family:
        base.save_pretrained(folder)
    else:
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file({k: v.detach().clone().contiguous() for k, v in base.state_dict().items()},
                  str(folder / "model.safetensors"))
    return folder


def merged_model(base, out: Path):
    """`base` with the weights of the merged model folder `out`; keys the base lacks are an error."""
    from safetensors.torch import load_file

    state = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    model = copy.deepcopy(base)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"merged keys differ from the base: unexpected {unexpected[:3]}, missing {missing[:3]}")
    return model


def run_case(case: Case, work: Path) -> dict:
    """The four steps of the module docstring for one case: a row with each stage's outcome."""
    import adaptkit as ak
    from adaptkit.merge.engine import run_merge
    from peft import PeftModel, get_peft_model

    row = {"name": case.name, "model": case.model, "config": case.config_cls, "type": case.config_cls,
           "layer": "-", "notes": []}
    base = case.base()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = peft_config(case)
            row["type"] = type_label(config)
            pm = get_peft_model(copy.deepcopy(base), config).eval()
            row["layer"] = layer_kind(pm)
            if torch.allclose(case.run(pm), case.run(base)):
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in (p for p in pm.parameters() if p.requires_grad):
                        p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
            expected = case.run(pm)
            pm.save_pretrained(work / "peft")
            try:
                merge_ref = case.run(copy.deepcopy(pm).merge_and_unload())
            except Exception as e:  # noqa: BLE001 - PEFT cannot merge it: the adapted model is the reference
                merge_ref = expected
                row["notes"].append(f"PEFT cannot merge ({type(e).__name__})")
    except Exception as e:  # noqa: BLE001 - PEFT itself cannot build this case here
        return {**row, **{s: f"n/a: PEFT: {type(e).__name__}: {str(e)[:120]}" for s in STAGES}}
    if torch.allclose(expected, case.run(base)):
        row["notes"].append("the adapter is the identity on the test input")

    model, handle = copy.deepcopy(base), None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = ak.load_adapter(model, work / "peft")
        row["notes"] += [f"adaptkit warns: {str(w.message)[:160]}" for w in caught
                         if "adaptkit" in type(w.message).__module__ or "Adapter" in type(w.message).__name__]
        row["load"] = compare(case.run(model), expected)
    except Exception as e:  # noqa: BLE001 - one case's failure is a row of the table
        row["load"] = outcome(e, work)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base_dir = save_base(case, base, work / "base")
            run_merge({"merge_method": "task_arithmetic", "base_model": str(base_dir),
                       "models": [{"model": str(work / "peft"), "parameters": {"weight": 1.0}}]},
                      work / "merged", progress=False)
        row["merge"] = compare(case.run(merged_model(base, work / "merged")), merge_ref)
    except Exception as e:  # noqa: BLE001
        row["merge"] = outcome(e, work)
    if handle is None:
        row["reverse"] = "n/a: not loaded"
        return row
    try:
        handle.save(work / "ours")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = PeftModel.from_pretrained(copy.deepcopy(base), work / "ours").eval()
        row["notes"] += [f"PEFT warns: {str(w.message)[:160]}" for w in caught if "peft" in str(w.filename)]
        row["reverse"] = compare(case.run(theirs), expected)
    except Exception as e:  # noqa: BLE001
        row["reverse"] = outcome(e, work)
    return row


def run_all(cases: list[Case], progress: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    rows = []
    try:
        for i, case in enumerate(cases):
            with tempfile.TemporaryDirectory() as work:
                rows.append(run_case(case, Path(work)))
            if progress:
                print(f"[{i + 1}/{len(cases)}] {case.name}: " + ", ".join(rows[-1][s].split(":")[0] for s in STAGES),
                      file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    return rows


def status(row: dict) -> str:
    """A case's overall outcome: WRONG over FAILED over refused over equal; n/a when PEFT cannot build it."""
    stages = [row[s] for s in STAGES]
    for word in ("WRONG", "FAILED", "refused"):
        if any(s.startswith(word) for s in stages):
            return word
    return "n/a" if all(s.startswith("n/a") for s in stages) else "equal"


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["type"], row["layer"]), []).append(row)
    head = ["PEFT type", "layer", "cases", "load=", "merge=", "reverse=", "refused", "FAILED", "WRONG", "PEFT n/a"]
    lines = [head]
    for (kind, layer), group in sorted(groups.items()):
        st = Counter(status(r) for r in group)
        lines.append([kind, layer, len(group), *(sum(r[s] == "equal" for r in group) for s in STAGES),
                      st["refused"], st["FAILED"], st["WRONG"], st["n/a"]])
    st = Counter(status(r) for r in rows)
    lines.append(["all", "", len(rows), *(sum(r[s] == "equal" for r in rows) for s in STAGES),
                  st["refused"], st["FAILED"], st["WRONG"], st["n/a"]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    text = ["  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join(text)


def report(rows: list[dict]) -> str:
    out = [table(rows)]
    for word in ("WRONG", "FAILED"):
        bad = [r for r in rows if status(r) == word]
        if bad:
            out.append(f"\n{word}:")
            out += [f"  {r['name']} [{r['type']}, {r['layer']}]: " + "; ".join(f"{s} {r[s]}" for s in STAGES
                                                                                if r[s].startswith(word)) for r in bad]
    refusals = Counter(r[s][len("refused: "):].split(" (known:")[0] for r in rows for s in STAGES
                       if r[s].startswith("refused"))
    if refusals:
        out.append("\nrefusals (stage count × line):")
        out += [f"  {n:4d} × {line[:150]}" for line, n in refusals.most_common()]
    warned = Counter(note[:150] for r in rows for note in r["notes"] if " warns: " in note)
    if warned:
        out.append("\nwarnings loading the other tool's files (case count × warning):")
        out += [f"  {n:4d} × {line}" for line, n in warned.most_common()]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="only cases whose name contains this (case-insensitive)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--progress", action="store_true", help="one line per case on stderr")
    args = parser.parse_args()
    rows = run_all(all_cases(args.only), progress=args.progress)
    print(json.dumps(rows, indent=1) if args.json else report(rows))


if __name__ == "__main__":
    main()
