"""A merge in words: the model card and recipe copy written into the output folder, and the resolved
plan `adaptkit merge --dry-run` prints.

Like mergekit (README.md and mergekit_config.yml), a merge writes README.md, a model card whose YAML
front matter the Hub indexes (`base_model`: the inputs that are Hub repositories, a local folder
being no Hub model; `tags`; `library_name` for a model), and `adaptkit_recipe.yml`, the recipe as
it ran (a command-line override such as --seed written in), so that running that file again gives
the same bytes. The card's body says which method merged which inputs with which parameters.
Without a card (--no-card) the output holds neither file: ones copied in with the base's side files
describe another model.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..hub.repos import is_hub_ref, lock_entry, parse_ref
from ..io.readers import read_json
from ..io.store import PIPELINE_INDEX
from .positions import LAYER_INDEX
from .recipe import RECIPE_KEYS, Recipe
from .refs import Ref

CARD = "README.md"
RECIPE_FILE = "adaptkit_recipe.yml"
TAGS = ["merge", "adaptkit"]


def recipe_document(recipe: Recipe) -> dict[str, Any]:
    """The recipe's mapping as given, with top-level settings changed since it was read (a command
    line's seed or dtype) written in; an empty mapping for a recipe built in code."""
    doc = copy.deepcopy(recipe.source)
    if not doc:
        return doc
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if f.name not in RECIPE_KEYS or not isinstance(value, (str, int, float, type(None))):
            continue  # sections (models, parameters, slices) and parsed forms stay as given
        default = None if f.default is dataclasses.MISSING else f.default
        if value != doc.get(f.name, default):
            doc[f.name] = value
    return doc


def hub_repo(model: str) -> str | None:
    """The Hub repository `model` names (`org/name[@rev]`, or a name pinned in ./adaptkit.lock), or None
    for a local path: only a Hub repository may be a card's `base_model`."""
    if Path(model).expanduser().exists():
        return None
    entry = lock_entry(model)
    if entry is not None:
        return entry.repo
    return parse_ref(model)[0] if is_hub_ref(model) else None


def library_name(folder: Path) -> str | None:
    """The Hub's `library_name` of a model folder: a pipeline's is the library that wrote its index, which
    says so in a `_<library>_version` key; a folder with a config.json is transformers'; weights alone, none."""
    if (folder / PIPELINE_INDEX).is_file():
        keys = read_json(folder / PIPELINE_INDEX)
        return next((k.strip("_").removesuffix("_version") for k in keys if k.endswith("_version")), None)
    return "transformers" if (folder / "config.json").is_file() else None


def write_card(folder: Path, stages: list[tuple[str | None, Recipe]], *, model: bool = True,
               aliases: dict[str, str] | None = None) -> None:
    """README.md and adaptkit_recipe.yml into `folder` for `stages` ((name, recipe) in run order, one
    for a plain recipe); `aliases` maps a model path an intermediate stage was written to, to its name."""
    import yaml

    docs = [{**({"name": name} if name else {}), **recipe_document(r)} for name, r in stages]
    given = all(r.source for _, r in stages)  # else a recipe built in code: no file to copy
    text = yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True) if given else None
    library = library_name(folder) if model else None
    (folder / CARD).write_text(model_card(stages, text, model=model, aliases=aliases or {}, library=library),
                               encoding="utf-8")
    if text is not None:
        (folder / RECIPE_FILE).write_text(text, encoding="utf-8")


def drop_card(folder: Path) -> None:
    """Remove a card and recipe copied in with the base's side files: they describe another model (mergekit
    copies no such file either)."""
    for name in (CARD, RECIPE_FILE):
        (folder / name).unlink(missing_ok=True)


def model_card(stages: list[tuple[str | None, Recipe]], recipe_text: str | None, *, model: bool = True,
               aliases: dict[str, str] | None = None, library: str | None = "transformers") -> str:
    """The card's text (see the module docstring). Its title names the (last) method, not the output folder:
    the same merge written to two folders gives the same files."""
    import yaml

    aliases = aliases or {}
    names = {name for name, _ in stages if name} | set(aliases)
    # a model's bases are its inputs (as mergekit lists them); an adapter's, the model it applies to
    hub = [repo for _, r in stages for ref in (_refs(r) if model else [r.base] if r.base else [])
           for part in (ref.model, *ref.adapters) if part not in names and (repo := hub_repo(part))]
    meta: dict[str, Any] = {}
    if hub:
        meta["base_model"] = list(dict.fromkeys(hub))
        if model:
            meta["base_model_relation"] = "merge"
    meta["tags"] = list(TAGS)
    if model and library:
        meta["library_name"] = library
    what = "model" if model else "adapter"
    if len(stages) == 1:
        intro = f"This {what} was merged with adaptkit from the recipe below (mergekit's format).\n\n"
        body = _stage(stages[0][1], aliases, level="##")
    else:
        intro = (f"This {what} was merged with adaptkit in {len(stages)} stages, each a document of the recipe "
                 "below (mergekit-multi's format); a stage's result is an input of later ones by its name.\n\n")
        body = "".join(f"## Stage {i + 1}: {f'`{name}`' if name else 'the output'}\n\n{_stage(r, aliases, '###')}"
                       for i, (name, r) in enumerate(stages))
    recipe = f"## Recipe\n\n```yaml\n{recipe_text}```\n" if recipe_text else ""
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n# A {stages[-1][1].method} merge\n\n{intro}{body}{recipe}"


def moe_card(config, summary: dict[str, Any], config_text: str | None) -> str:
    """`adaptkit moe`'s card: the output, its base and experts with their prompts, the gates, and the
    mergekit-moe config (mergekit-moe writes none). `config` is a moe_config.MoeConfig, `summary` its
    MoePlan's."""
    import yaml

    parts = [p for ref in (config.base, *(e.ref for e in (*config.experts, *config.shared)))
             for p in (ref.model, *ref.adapters)]
    meta: dict[str, Any] = {}
    if hub := list(dict.fromkeys(r for p in parts if (r := hub_repo(p)))):
        meta.update(base_model=hub, base_model_relation="merge")
    meta.update(tags=["moe", *TAGS], library_name="transformers")
    shared = f" and {len(config.shared)} shared expert" if config.shared else ""
    lines = [f"# A {summary['output_kind']} of {len(config.experts)} experts{shared}", "",
             f"This model was built with adaptkit from the mergekit-moe config below: a "
             f"`{summary['architecture']}` whose attention, norms and embeddings are "
             f"{_model(config.base, {})}'s and whose experts are these models' MLPs. Each token goes to "
             f"{config.experts_per_token} of the experts{' and to the shared one' if config.shared else ''}; the "
             f"routers come from gate mode `{config.gate_mode}`{_quantized_pass(summary.get('base_bits'))}.", "",
             "| expert | model | positive prompts | negative prompts | noise scale | residual scale |",
             "|---|---|---|---|---|---|"]
    def cell(value: Any) -> str:  # prompts quoted one by one, as JSON strings
        text = ", ".join(json.dumps(p, ensure_ascii=False) for p in value) if isinstance(value, list) else \
            "" if value is None else _number(value)
        return text.replace("|", "\\|")

    rows = [(str(i), e) for i, e in enumerate(config.experts)] + [("shared", e) for e in config.shared]
    lines += [f"| {label} | {_model(e.ref, {})} | {cell(e.positive)} | {cell(e.negative)} | {cell(e.noise_scale)} | "
              f"{cell(e.residual_scale)} |" for label, e in rows]
    recipe = f"\n## Config\n\n```yaml\n{config_text}```\n" if config_text else ""
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n" + recipe


def surgery_card(report: dict[str, Any]) -> str:
    """`adaptkit tokensurgeon`'s card: the model, the donor whose tokenizer it now has, how each row was
    made, and the options (mergekit-tokensurgeon writes no card)."""
    import yaml

    meta: dict[str, Any] = {}
    if hub := [r for p in (report["model"], report["donor"]) for part in p.split("+") if (r := hub_repo(part))]:
        meta["base_model"] = list(dict.fromkeys(hub))
    meta.update(tags=["tokensurgeon", *TAGS], library_name="transformers")
    lines = [f"# {report['model']} with {report['donor']}'s tokenizer", "",
             f"This model is `{report['model']}` with the tokenizer of `{report['donor']}`, made with adaptkit "
             f"tokensurgeon: {report['vocab_size']} token rows (the model had {report['model_vocab_size']}). A token "
             "both tokenizers have keeps the model's row; the others were approximated by "
             f"`{report['method']}` from the tokens they share.", "",
             "| tensor | same token | byte token | prefix | approximated | zero |", "|---|---|---|---|---|---|"]
    lines += [f"| `{name}` | {c['exact']} | {c['byte']} | {c['prefix']} | {c['approximated']} | {c['zeroed']} |"
              for name, c in report["tensors"].items()]
    options = {k: v for k, v in report["options"].items() if v is not None}
    lines += ["", "Options: " + ", ".join(f"`{k}: {_inline(v)}`" for k, v in options.items())
              + (f", seed {report['seed']}" if report.get("seed") is not None else "") + "."]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def _quantized_pass(bits: int | None) -> str:
    return "" if bits is None else (f", the base's hidden states computed with its linear layers quantized to {bits} "
                                    f"bits by bitsandbytes (mergekit-moe's --load-in-{bits}bit)")


def _refs(recipe: Recipe) -> list[Ref]:
    return [*recipe.models, *([recipe.base] if recipe.base else [])]


def _stage(recipe: Recipe, aliases: dict[str, str], level: str) -> str:
    """One recipe's method, its inputs with their parameters, and its global parameters."""
    base = f", with {_model(recipe.base, aliases)} as the base" if recipe.base else ""
    lines = [f"Method: `{recipe.method}`{base}.", "", f"{level} Inputs", "", "| model | parameters |", "|---|---|"]
    if recipe.parts:
        module = "module | " if recipe.modules else ""
        lines[-2:] = [f"| {module}output slice | model | layers | parameters |", f"|{'---|' * (4 + bool(module))}"]
        notes = []
        for m in recipe.parts:
            cell = f"{m.name} | " if m.name else ""
            if m.parameters:
                notes.append(f"Module {m.name}: {_params(m.parameters)}")
            for i, part in enumerate(m.slices):
                lines += [f"| {cell}{'' if m.whole else i} | {_model(s.ref, aliases)} | "
                          f"{'all' if s.layers is None else list(s.layers)} | {_params(s.parameters)} |"
                          for s in part.sources]
                if part.base or part.parameters:
                    base = f"base {_model(part.base, aliases)}" if part.base else ""
                    notes.append(f"{m.name + ' s' if m.name else 'S'}lice {i}: "
                                 + "; ".join(filter(None, [base, _params(part.parameters)])))
        lines += ["", *notes] if notes else []
    else:
        lines += [f"| {_model(ref, aliases)} | {_params(p)} |" for ref, p in zip(recipe.models, recipe.model_params)]
    if recipe.parameters:
        lines += ["", f"Global parameters: {_params(recipe.parameters)}"]
    return "\n".join(lines) + "\n\n"


def _model(ref: Ref, aliases: dict[str, str]) -> str:
    parts = []
    for part in (ref.model, *ref.adapters):
        repo = None if part in aliases else hub_repo(part)
        parts.append(f"stage `{aliases[part]}`" if part in aliases else
                     f"[{part}](https://huggingface.co/{repo})" if repo else f"`{part}`")
    return " + ".join(parts)


def _params(params: dict[str, Any]) -> str:
    """`key: value` pairs as YAML writes them inline (a gradient [a, b], conditions {filter, value})."""
    shown = ", ".join(f"{k}: {_inline(v)}" for k, v in params.items())
    return shown.replace("|", "\\|")


def _inline(value: Any) -> str:
    """A value as YAML writes it on one line."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# -- the plan --dry-run shows ----------------------------------------------------------------------
def parameter_groups(plan) -> list[dict[str, Any]]:
    """The engine's Plan as groups of output tensors whose operator parameters are equal once gradients
    and filters are resolved (`Plan.parameters`), in model order: each with its parameters (per-model ones
    as one value per input), the layer indices it covers and its tensors; in a multimodal model, per module
    (its `module`), whose layers are numbered on their own; where a union's tensors are in only some
    inputs, those (`inputs`), whose values the per-model ones are."""
    from .modules import DEFAULT, architecture_modules, owner

    modules = architecture_modules(plan.config or (plan.base or plan.inputs[0]).config)
    groups: dict[str, dict[str, Any]] = {}
    for name in plan.names:
        params, job = plan.parameters(name), plan.job(name)
        where = owner(name, modules)
        module = {} if modules is DEFAULT else {"module": where}
        if not plan.jobs and len(job.inputs) < len(plan.inputs):  # (`tensors: union`: the inputs that have it)
            module["inputs"] = [str(source.ref) for source, _ in job.inputs]
        group = groups.setdefault(json.dumps([module, params], sort_keys=True, default=str),
                                  {**module, "parameters": params, "layers": [], "tensors": []})
        group["tensors"].append(name)
        spec = modules.get(where)
        found = None if spec and spec.at_last_layer(name) else LAYER_INDEX.search(name)  # (its mlp.0 is no layer)
        if found and int(found.group(1)) not in group["layers"]:
            group["layers"].append(int(found.group(1)))
    return list(groups.values())


def describe_group(group: dict[str, Any]) -> str:
    """One line of --dry-run's text: which tensors, then their parameters."""
    count = len(group["tensors"])
    layers = group["layers"]
    where = f"layer{'s' if len(layers) > 1 else ''} {_ranges(layers)}" if layers else "outside the layers"
    if layers and any(not LAYER_INDEX.search(n) for n in group["tensors"]):
        where += " and outside them"
    values = ", ".join(f"{k}={_number(v)}" for k, v in group["parameters"].items()) or "no parameters"
    module = f"{group['module']}: " if group.get("module") else ""
    inputs = f" of {', '.join(group['inputs'])}" if group.get("inputs") else ""
    return f"{module}{where} ({count} tensor{'s' if count != 1 else ''}{inputs}): {values}"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _number(value: Any) -> str:
    """A resolved value as text: floats to 4 significant digits (a gradient gives 0.30000000000000004)."""
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).lower() if isinstance(value, bool) else str(value)
