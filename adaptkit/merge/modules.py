"""mergekit's `modules:`: the parts of a multimodal or encoder-decoder model (a text decoder, a vision
tower, a projector), each merged from its own `slices:` or `models:` with its own `parameters:`.

    modules:
      text_decoder:                  # a module of the architecture, by mergekit's name
        slices: [...]                # or models: [...]; mergekit's slices and models, within the module
        parameters: {t: 0.7}         # between a slice's parameters and the recipe's
      vision_tower: {models: [{model: a}, {model: b}]}
      multi_modal_projector: {models: [{model: a}, {model: b}]}

mergekit knows which weights make each module from its architecture tables. adaptkit knows the module
by the name prefixes it owns (the table below, one entry per `model_type`, with both the names
checkpoints are saved under: `language_model.model.layers.…` and transformers' newer
`model.language_model.layers.…`): a tensor belongs to the module with the longest prefix it starts
with. A module's layers are the one stack of numbered tensors among its own (`<stack>.<i>.<rest>`),
counted at its config.json key; each module's layers are sliced and renumbered on their own, and its
count set in the output's config, as mergekit does. A module with no layers (a projector) takes
`models:`. Any other architecture has one module, `default` (mergekit's name), owning every tensor.

mergekit writes only the modules a recipe lists, so an output missing one loads with that part's
weights at random; adaptkit refuses that recipe instead, naming the modules left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import AdaptkitError
from ..validate import short
from .layer_config import output_config
from .slices import LAYER_COUNT_KEYS, Job, Slice, SliceSource, Stack, parse_slices, slice_jobs


@dataclass(frozen=True)
class ModuleSpec:
    """The tensor-name prefixes one module owns and where its layers are counted: dotted config.json keys
    (the first present counts) or a fixed number (mergekit's `override_num_layers`); neither: no layers."""

    prefixes: tuple[str, ...]
    count_keys: tuple[str, ...] = ()
    fixed: int | None = None
    #: Tensors (name substrings) that mergekit's table lists as layer weights without a layer index, beside
    #: `override_num_layers: 2`: each layer's plan merges them again, and which one is written is its task
    #: scheduler's order; here the last one's, gradient position 1 (Qwen2-VL's projector MLP; measured: a
    #: density gradient's last value, TIES, and slerp's t; but a weight gradient of task_arithmetic got the
    #: first layer's value for mlp.2.weight and the last one's for mlp.0.weight: benchmarks/mergekit_fuzz.py).
    last_layer: tuple[str, ...] = ()

    def at_last_layer(self, name: str) -> bool:
        return any(part in name for part in self.last_layer)

    @property
    def layered(self) -> bool:
        return bool(self.count_keys) or self.fixed is not None


def _vision_language(vision: str, vision_prefix: str) -> dict[str, ModuleSpec]:
    """Llava-style models (LLaVA, Mistral 3, Gemma 3, Llama 4, PaliGemma): language model, vision part,
    projector, each under its own prefix (also under `model.`, as transformers 5 saves them); LLaVA-NeXT's
    `image_newline` (the row it appends to each image row) goes with the projector."""
    return {"text_decoder": ModuleSpec(("language_model.", "model.language_model.", "lm_head."),
                                       ("text_config.num_hidden_layers",)),
            vision: ModuleSpec((vision_prefix, f"model.{vision_prefix}"), ("vision_config.num_hidden_layers",)),
            "multi_modal_projector": ModuleSpec(("multi_modal_projector.", "model.multi_modal_projector.",
                                                 "image_newline", "model.image_newline"))}


def _qwen_vl(deepstack: bool) -> dict[str, ModuleSpec]:
    """Qwen2-VL, Qwen2.5-VL (text under `model.`, vision under `visual.`) and Qwen3-VL (`model.language_model.`,
    `model.visual.`, and three numbered deepstack mergers in the projector)."""
    projector = ("visual.merger.", "model.visual.merger.") + (("model.visual.deepstack_merger_list.",) if deepstack else ())
    return {"text_decoder": ModuleSpec(("model.", "lm_head."), ("text_config.num_hidden_layers", "num_hidden_layers")),
            "vision_tower": ModuleSpec(("visual.", "model.visual."), ("vision_config.depth",)),
            "multi_modal_projector": ModuleSpec(projector, fixed=3 if deepstack else None,
                                                last_layer=() if deepstack else ("merger.mlp.",))}


#: model_type -> module name -> what it owns (names from mergekit's architecture tables; LLaVA, LLaVA-NeXT
#: and PaliGemma, which mergekit has none for, named as its other Llava-style models)
ARCHITECTURES: dict[str, dict[str, ModuleSpec]] = {
    "llava": _vision_language("vision_tower", "vision_tower."),
    "llava_next": _vision_language("vision_tower", "vision_tower."),
    "paligemma": _vision_language("vision_tower", "vision_tower."),
    "mistral3": _vision_language("vision_tower", "vision_tower."),
    "gemma3": _vision_language("vision_tower", "vision_tower."),
    "llama4": _vision_language("vision_model", "vision_model."),
    "qwen2_vl": _qwen_vl(False),
    "qwen2_5_vl": _qwen_vl(False),
    "qwen3_vl": _qwen_vl(True),
    "qwen3_vl_moe": _qwen_vl(True),
    "t5": {"encoder": ModuleSpec(("encoder.",), ("num_layers", "num_hidden_layers")),
           "decoder": ModuleSpec(("decoder.",), ("num_decoder_layers",)),
           "shared": ModuleSpec(("shared.", "lm_head."))},
    "whisper": {"encoder": ModuleSpec(("model.encoder.",), ("encoder_layers",)),
                "decoder": ModuleSpec(("model.decoder.", "proj_out."), ("decoder_layers",))},
}
DEFAULT = {"default": ModuleSpec(("",), LAYER_COUNT_KEYS)}


def architecture_modules(config: dict | None) -> dict[str, ModuleSpec]:
    """The modules of a model with this config.json: its architecture's, else the one `default`."""
    return ARCHITECTURES.get((config or {}).get("model_type"), DEFAULT)


def owner(name: str, modules: dict[str, ModuleSpec]) -> str | None:
    """The module owning tensor `name`: the one with the longest prefix it starts with (None: no module)."""
    best = max(((len(p), module) for module, spec in modules.items() for p in spec.prefixes if name.startswith(p)),
               default=None)
    return best[1] if best else None


def split(names, modules: dict[str, ModuleSpec], ref) -> dict[str, list[str]]:
    """Tensor names by owning module, every module present (a tensor no module owns is an error)."""
    parts: dict[str, list[str]] = {m: [] for m in modules}
    for name in names:
        module = owner(name, modules)
        if module is None:
            raise AdaptkitError(f"{ref}: tensor '{name}' belongs to none of its architecture's modules "
                                f"({', '.join(modules)})")
        parts[module].append(name)
    return parts


MODULE_KEYS = {"slices", "models", "parameters"}


@dataclass
class Module:
    """A sliced part of a recipe: one entry of `modules:` (`name`), or a `slices:` recipe's one part (no
    name). A module given as `models:` (`whole`) is one slice over all its layers: its sources' layer
    ranges are None until the models' layers are counted (`Stack`)."""

    name: str | None
    slices: list[Slice]
    parameters: dict[str, Any] = field(default_factory=dict)
    whole: bool = False

    @property
    def label(self) -> str:
        """What places in it start with: `modules.<name>.` ('' for a slices recipe)."""
        return f"modules.{self.name}." if self.name else ""


def parse_modules(src: str, entries: Any, check_keys: Callable, read_part: Callable, read_models: Callable,
                  read_parameters: Callable, base) -> list[Module]:
    """The recipe's `modules:` checked: module name -> exactly one of `slices` (as a recipe's) and `models`
    (each model with its parameters; the base model added when it is none of them, as mergekit does), and
    `parameters`. Which names are modules is known once the models are read (the engine)."""
    if not isinstance(entries, dict) or not entries:
        raise AdaptkitError(f"{src}: modules must be a mapping of module names to {{slices or models, parameters}}, "
                            f"got {short(entries)}")
    modules = []
    for name, entry in entries.items():
        where = f"{src}: modules.{name}"
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise AdaptkitError(f"{src}: modules maps module names to {{slices or models, parameters}}, got "
                                f"{short(name)}: {short(entry)}")
        check_keys(where, entry, MODULE_KEYS)
        if ("slices" in entry) == ("models" in entry):
            raise AdaptkitError(f"{where}: give 'slices' or 'models' (one of them)")
        parameters = read_parameters(f"{where}.parameters", entry.get("parameters"))
        if "slices" in entry:
            modules.append(Module(name, parse_slices(where, entry["slices"], read_part), parameters))
            continue
        refs, params = read_models(where, entry["models"])
        sources = [SliceSource(ref, None, p) for ref, p in zip(refs, params)]
        if base is not None and str(base) not in map(str, refs):
            sources.append(SliceSource(base, None, {}))
        modules.append(Module(name, [Slice(sources, None, {})], parameters, whole=True))
    return modules


def check_modules(parts: list[Module], modules: dict[str, ModuleSpec], owned: dict[str, list[str]], ref) -> None:
    """A `modules:` recipe names modules of the architecture, and every module that has tensors."""
    named = [p.name for p in parts]
    if unknown := [n for n in named if n not in modules]:
        raise AdaptkitError(f"modules.{unknown[0]}: {ref} has no module '{unknown[0]}' (its modules: "
                            f"{', '.join(modules)})")
    if missing := [m for m in modules if owned[m] and m not in named]:
        raise AdaptkitError(f"modules: {', '.join(missing)} of {ref} {'is' if len(missing) == 1 else 'are'} not in "
                            f"the recipe, so the output would lack {'its' if len(missing) == 1 else 'their'} "
                            f"{sum(len(owned[m]) for m in missing)} tensors (mergekit writes it without them); "
                            "list every module")


def part_jobs(recipe, opened: dict[str, Any], donor, takes_base: bool) -> tuple[dict[str, Job], dict]:
    """The output tensors of a `slices:` or `modules:` recipe, in order, and its config.json: each part's
    slices over its own layers (a module's tensors only), a module's `models:` over all of them. `opened`:
    each input by str(ref); `donor`: the model whose config.json the output's is made from."""
    modules = architecture_modules(donor.config)
    owned = {ref: split(source.keys(), modules, ref) for ref, source in opened.items()}
    parts, base = recipe.parts, recipe.base
    if recipe.modules:
        check_modules(parts, modules, owned[str(parts[0].slices[0].sources[0].ref)], donor.ref)
    elif modules is not DEFAULT:
        raise AdaptkitError(f"{donor.ref} is a {donor.config['model_type']} model of modules ({', '.join(modules)}): "
                            "slice it with `modules:`, one module at a time")
    jobs: dict[str, Job] = {}
    counted = []
    for part in parts:
        spec = modules[part.name or "default"]
        stacks = {ref: Stack(source, owned[ref][part.name] if part.name else None, spec.count_keys, spec.fixed,
                             part.name) for ref, source in opened.items()}
        slices = [Slice([SliceSource(s.ref, (0, stacks[str(s.ref)].count), s.parameters) for s in one.sources],
                        one.base, one.parameters) for one in part.slices] if part.whole else part.slices
        made = slice_jobs(slices, stacks, base if takes_base else None, takes_base, part.label, part.whole,
                          part.parameters)
        for name, job in made.items():  # (`ModuleSpec.last_layer`)
            job.t = 1.0 if spec.at_last_layer(name) else job.t
        jobs.update(made)
        counted.append((slices, stacks))
    return jobs, output_config(donor.config, counted)
