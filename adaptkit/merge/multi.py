"""Multi-stage recipes (mergekit-multi's format): one YAML file of several documents, each a recipe
with a `name`; a later stage uses an earlier one's result as a model by that name (as `model:`,
`base_model:`, a slice's source, or either side of `base+adapter`).

`adaptkit merge FILE -o OUT` runs the stages in dependency order and writes the final stage (the one
without a name, else the last document) to OUT. Intermediate results live inside OUT's temporary
folder (`io.outputs.atomic_output`), each deleted once the last stage using it has run; a failure at
any stage removes that folder, so nothing is left behind and an existing OUT stays as it was. Unlike
mergekit-multi there is no intermediate folder to keep or reuse: every stage runs each time. A random
method's draws in a named stage are seeded with its name too (`positions.seeded_generators`), so no two
stages draw alike (mergekit-multi with --random-seed seeds every stage with it again: its stages draw
the same numbers, and a later stage's DARE masks thin an earlier one's). Refused
in one line, before any stage runs: two stages with one name, two without one, a name that is no
plain folder name, a cycle, a reference that is neither a stage, a folder nor a Hub reference, and a
stage the final one does not use (its result would be thrown away).
"""
from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError
from ..hub.repos import is_reference
from ..io.outputs import atomic_output
from ..io.paths import regular_file
from ..io.readers import read_yaml_documents
from ..validate import short
from .card import write_card
from .recipe import Recipe, apply_overrides, load_recipe

NAME = "name"  # the key mergekit-multi adds to a recipe
STAGE_NAME = re.compile(r"[\w-][\w.-]*")  # a folder name; not ".final", which is the final stage's
WORK = ".stages"  # intermediate results, inside the output's temporary folder


@dataclass
class Stage:
    name: str | None
    doc: dict[str, Any]  # the recipe as written, without `name`
    needs: list[str] = field(default_factory=list)  # the stages it uses, by name


def read_documents(path: str | Path) -> list[Any]:
    """The file's YAML documents, empty ones (a trailing `---`) left out."""
    return [doc for doc in read_yaml_documents(regular_file(path, "recipe file")) if doc is not None]


def is_multi(docs: list[Any]) -> bool:
    """Several documents, or one that names itself: a multi-stage recipe."""
    return len(docs) > 1 or (len(docs) == 1 and isinstance(docs[0], dict) and NAME in docs[0])


def load_stages(path: str | Path, docs: list[Any] | None = None) -> list[Stage]:
    """The stages in run order (each after the stages it needs), the final one last."""
    docs = read_documents(path) if docs is None else docs
    stages: list[Stage] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise AdaptkitError(f"{path}: document {i + 1} is not a recipe (a mapping), got {short(doc)}")
        doc = dict(doc)
        name = doc.pop(NAME, None)
        if name is not None and (not isinstance(name, str) or not STAGE_NAME.fullmatch(name)):
            raise AdaptkitError(f"{path}: document {i + 1}: a stage name is letters, digits, '.', '_' and '-', "
                                f"not starting with '.', got {short(name)}")
        if any(s.name == name for s in stages):
            raise AdaptkitError(f"{path}: two stages are named '{name}'" if name else
                                f"{path}: two documents have no name; only the final stage may go without one")
        stages.append(Stage(name, doc))
    if not stages:
        raise AdaptkitError(f"{path}: the recipe is empty")
    names = {s.name for s in stages if s.name}
    for stage in stages:
        _rewrite(stage.doc, lambda part, stage=stage: _need(path, stage, part, names))
    final = next((s for s in stages if s.name is None), stages[-1])
    order = _order(path, final, {s.name: s for s in stages})
    unused = [s.name for s in stages if s not in order]
    if unused:
        raise AdaptkitError(f"{path}: the final stage{_called(final)} does not use stage '{unused[0]}' (directly or "
                            "through another stage), so its result would be thrown away; use it or remove it")
    return order


def _called(stage: Stage) -> str:
    return f" '{stage.name}'" if stage.name else ""


def _need(path, stage: Stage, part: str, names: set[str]) -> str:
    """Note a reference to another stage; refuse one that names nothing (no stage, folder or Hub repo)."""
    if part in names:
        if part not in stage.needs:
            stage.needs.append(part)
    elif not Path(part).expanduser().exists() and not is_reference(part):
        listing = ", ".join(sorted(names)) or "none"
        # mergekit-multi keeps stage X in <intermediate dir>/X, and recipes written for a run of it sometimes
        # name that folder: a hint, not a guess (the folder could hold another model)
        hint = (f"; for the result of stage '{Path(part).name}', write '{Path(part).name}'"
                if Path(part).name in names else "")
        raise AdaptkitError(f"{path}: stage{_called(stage) or ' (final)'}: '{part}' is neither a stage (stages: "
                            f"{listing}) nor a folder nor a Hub reference{hint}")
    return part


def _order(path, final: Stage, by_name: dict[str | None, Stage]) -> list[Stage]:
    """Depth-first from the final stage: each stage after the ones it needs; a cycle is refused."""
    order: list[Stage] = []
    visiting: list[str | None] = []

    def visit(stage: Stage) -> None:
        if stage in order:
            return
        if stage.name in visiting:
            cycle = visiting[visiting.index(stage.name):] + [stage.name]
            raise AdaptkitError(f"{path}: the stages use each other in a cycle: {' -> '.join(map(str, cycle))}")
        visiting.append(stage.name)
        for name in stage.needs:
            visit(by_name[name])
        visiting.pop()
        order.append(stage)

    visit(final)
    return order


def _rewrite(doc: Any, swap) -> Any:
    """`doc` with each model reference (the values of `model` and `base_model`, a reference mapping's `lora`
    and `path`, the items of a `models` list) passed part by part (`base+adapter`) through `swap`, and
    each model a tokenizer comes from (`tokenizer_source`, the `tokenizer:` block's `source`s); other
    values as they are."""
    if isinstance(doc, list):
        return [_rewrite(item, swap) for item in doc]
    if not isinstance(doc, dict):
        return doc
    out = {}
    for key, value in doc.items():
        if key in ("model", "base_model", "lora", "path") and isinstance(value, str):  # (lora, path: mappings)
            value = "+".join(swap(part) for part in value.split("+"))
        elif key in ("tokenizer_source", "source") and isinstance(value, str):
            value = _tokenizer_model(value, swap)
        elif key == "models" and isinstance(value, list):
            value = ["+".join(swap(p) for p in v.split("+")) if isinstance(v, str) else _rewrite(v, swap)
                     for v in value]
        else:
            value = _rewrite(value, swap)
        out[key] = value
    return out


def _tokenizer_model(value: str, swap) -> str:
    """A tokenizer source names a model (`model:<ref>` or `<ref>`) unless it is `base` or `union`."""
    if value in ("base", "union"):
        return value
    return "model:" + swap(value[len("model:"):]) if value.startswith("model:") else swap(value)


def external_inputs(stages: list[Stage]) -> list[str]:
    """The paths the stages read that no stage makes (for the output's checks)."""
    names = {s.name for s in stages}
    found: list[str] = []

    def note(part: str) -> str:
        if part not in names and part not in found:
            found.append(part)
        return part

    for stage in stages:
        _rewrite(stage.doc, note)
    return found


def run_stages(path: str | Path, out: str | Path, *, force: bool = False, card: bool = True,
               docs: list[Any] | None = None, **options: Any) -> dict[str, Any]:
    """Run a multi-stage recipe into `out` (see the module docstring); `options` go to every stage's
    `run_merge`. Returns the final stage's report with `stages`, each stage's report in run order."""
    from .engine import run_merge  # here: the engine imports torch, which reading and describing stages need not

    stages = load_stages(path, docs)
    final = stages[-1]
    with atomic_output(out, force=force, inputs=external_inputs(stages)) as tmp:
        folders = {s.name: tmp / WORK / s.name for s in stages[:-1]}
        swaps = {name: str(folder) for name, folder in folders.items()}
        recipes = [_recipe(path, s, swaps) for s in stages]  # every stage checked before any runs
        last_use = {name: max(i for i, s in enumerate(stages) if name in s.needs) for name in folders}
        reports = []
        for i, (stage, recipe) in enumerate(zip(stages, recipes)):
            dest = tmp / WORK / ".final" if stage is final else folders[stage.name]
            try:
                reports.append(run_merge(recipe, dest, card=False, **options))
            except AdaptkitError as e:
                raise AdaptkitError(f"{path}: stage{_called(stage) or ' (final)'}: {e}") from None
            for name in [n for n, last in last_use.items() if last == i]:
                shutil.rmtree(folders[name])
        if card:
            write_card(tmp / WORK / ".final", [(s.name, r) for s, r in zip(stages, recipes)],
                       model=recipes[-1].output_kind == "model", aliases={v: k for k, v in swaps.items()})
        for item in (tmp / WORK / ".final").iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / WORK)
    report = dict(reports[-1], output=str(out), stages=[dict(r, name=s.name) for s, r in zip(stages, reports)])
    return report


def _recipe(path, stage: Stage, swaps: dict[str, str]) -> Recipe:
    """The stage's recipe with stage names as the folders their results go to; its `source` keeps the
    names (the card and adaptkit_recipe.yml show the recipe as written)."""
    try:
        recipe = load_recipe(_rewrite(stage.doc, lambda part: swaps.get(part, part)))
    except AdaptkitError as e:
        raise AdaptkitError(f"{path}: stage{_called(stage) or ' (final)'}: {e}") from None
    recipe.source = copy.deepcopy(stage.doc)
    recipe.stage = stage.name
    return recipe


def describe_stages(path: str | Path, docs: list[Any] | None = None, *, threads: int | None = None,
                    allow_pickle: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stages in run order with their method and inputs (`merge --dry-run`). A stage that uses no other
    stage's result also gets its `plan`, as a recipe of its own has (parameter groups, estimated peak);
    one that does cannot be planned before that result exists (`plan` None). `overrides`: the command
    line's settings over each stage's (`recipe.apply_overrides`), as `run_stages` passes them to each."""
    from .engine import Plan  # (torch: only to plan)

    stages = load_stages(path, docs)
    rows = []
    for stage in stages:
        recipe = apply_overrides(_recipe(path, stage, {}), overrides or {})
        planned = not stage.needs and recipe.output_kind != "adapter"
        plan = Plan(recipe, allow_pickle=allow_pickle).dry_run(threads) if planned else None
        rows.append({"name": stage.name, "method": recipe.method, "inputs": [str(r) for r in recipe.models],
                     "base": str(recipe.base) if recipe.base else None, "uses": stage.needs, "plan": plan})
    return {"stages": rows, "final": stages[-1].name}


__all__ = ["Stage", "describe_stages", "is_multi", "load_stages", "read_documents", "run_stages"]
