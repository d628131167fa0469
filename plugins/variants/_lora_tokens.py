"""LoRA's `trainable_token_indices` (PEFT's LoraConfig field): trainable tokens beside the LoRA, one adapter.

The field holds token ids for the model's input embedding, or {layer name: ids} (a name matches a layer
path equal to it or ending in `.<name>`, as PEFT). Each such Embedding gets PEFT's TrainableTokens
(`trainable_tokens.py`): its rows at the ids are replaced by a trained table T,

    E'[t] = T[j]   for t = ids[j],      E'[t] = E[t] otherwise,

so ΔE = E' − E is zero outside those rows and depends on the base. A layer whose weight is that
embedding's own tensor (an output head tied to it, `tie_word_embeddings`) uses the same T for the logits
of those tokens. PEFT saves T once, as `<embedding>.token_adapter.trainable_tokens_delta` beside the LoRA's
tensors (the tied head's copy is not saved), and merges it by writing the rows.

Here a layer is either a LoRA layer or a tokens layer (PEFT cannot stack both on one layer either); the
lora variant hands tokens layers to these functions, which reuse the trainable_tokens variant's.
"""
from __future__ import annotations

from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError

from .trainable_tokens import ROLE, TRAINABLE_TOKENS, _weight, check_indices, rows_delta

KEY = "trainable_token_indices"
STORED = f"token_adapter.{ROLE}"  # PEFT's key under the embedding's path
LAYERS, TIED = "token_layers", "token_tied"  # inject's config after `prepare`: path -> ids, tied copies


# -- tensor plane ------------------------------------------------------------------------------------
def fold(adapter: AdapterFiles, where: str) -> set[str]:
    """The tokens modules (PEFT's `<path>.token_adapter.trainable_tokens_delta`, read as a whole tensor) filed
    under their embedding's path, each checked: k rows for k ids. A config naming tokens the file does not
    store keeps those rows as they are (PEFT starts T at the embedding's rows): nothing changes there."""
    for key in [k for k in adapter.saved if k.endswith("." + STORED)]:
        owner = key.removesuffix("." + STORED)
        if owner in adapter.modules:
            raise AdaptkitError(f"{where}: '{owner}' holds LoRA tensors and trainable tokens together")
        adapter.modules[owner] = {ROLE: adapter.saved.pop(key)}
        adapter.transposed[owner] = False
    for module in held(adapter):
        shape, ids = adapter.shape(module, ROLE), indices(adapter.config, module, where)
        if len(shape) != 2 or shape[0] != len(ids):
            raise AdaptkitError(f"{where}: '{module}' stores trainable tokens of shape {list(shape)} but {KEY} "
                                f"lists {len(ids)} tokens")
    return held(adapter)


def held(adapter: AdapterFiles) -> set[str]:
    """The stored modules that are trainable tokens (after `fold`)."""
    return {m for m, roles in adapter.modules.items() if ROLE in roles}


def indices(config: dict[str, Any], path: str, where: str) -> list[int]:
    """The token ids of layer `path`: the list, or the one entry of the dict naming the layer (the vocabulary's
    size is checked against the base, in `rows_delta`)."""
    given = config.get(KEY)
    if isinstance(given, dict):
        found = [ids for name, ids in given.items() if _named(path, name)]
        if len(found) != 1:
            raise AdaptkitError(f"{where}: {KEY} has {len(found) or 'no'} entries for the layer '{path}'")
        given = found[0]
    return check_indices(given, 2**62, f"{where}: {KEY}")


def delta(adapter: AdapterFiles, module: str, base) -> Any:
    """ΔE = E' − E of a stored tokens module (rows are tokens, as the embedding stores them)."""
    where = f"{adapter.store.root}/adapter_config.json"
    return rows_delta(module, adapter.tensor(module, ROLE), indices(adapter.config, module, where), base)


def describe(adapter: AdapterFiles, held: set[str]) -> dict[str, Any]:
    """For `inspect`: the number of tokens per tokens module."""
    return {KEY: {m: adapter.shape(m, ROLE)[0] for m in sorted(held)}} if held else {}


# -- module plane ------------------------------------------------------------------------------------
def prepare(model, config: dict[str, Any]) -> dict[str, Any]:
    """The LoRA's layers (found by its targeting keys) and the tokens layers as one explicit target list:
    the layers `trainable_token_indices` names (a list: the model's input embedding) and every layer whose
    weight is one of theirs (a tied head), with their ids."""
    from adaptkit.plugin import find_targets

    given = config.get(KEY)
    if not given or config["target_modules"] is None:  # no LoRA targets: the core refuses (`train`: all-linear)
        return config
    if isinstance(given, dict) and all(isinstance(name, str) for name in given):
        names = dict(given)
    elif not isinstance(given, list):
        raise AdaptkitError(f"{KEY} must be a list of token ids or {{layer name: ids}}, got {given!r}")
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found = [p for p, m in model.named_modules() if p and m is embedding]
        names = {found[0] if found else "embed_tokens": given}  # PEFT's fallback name
    layers = {}
    for name, ids in names.items():
        paths = [p for p in find_targets(model, [name]) if _named(p, name)]
        layers |= dict.fromkeys(paths, ids)
    storages = {_weight(model.get_submodule(p)).data_ptr(): ids for p, ids in layers.items()}
    if len(storages) != len(layers):  # PEFT ties them only with equal ids, and saves T under the embedding then
        raise AdaptkitError(f"{KEY} names layers sharing one weight ({', '.join(sorted(layers))}): name the "
                            "embedding only (a tied head follows it)")
    tied = {p: storages[_weight(m).data_ptr()] for p, m in model.named_modules()
            if p and p not in layers and ".base_layer" not in p and _weight(m) is not None
            and _weight(m).data_ptr() in storages}
    lora = find_targets(model, config["target_modules"], exclude_modules=config["exclude_modules"],
                        layers_to_transform=config["layers_to_transform"], layers_pattern=config["layers_pattern"])
    # PEFT refuses both on one layer, however it is named ("trainable_token_indices cannot be applied to modules
    # of type lora.Embedding"); a loaded file lists its tokens layers among its modules, excluded (`from_file`)
    clash = (set(lora) & set(layers)) | (set(lora) & set(tied))
    if clash:
        raise AdaptkitError(f"{', '.join(sorted(clash))}: a LoRA and {KEY} on the same layer (PEFT refuses it too: "
                            f"{KEY} cannot be applied to a LoRA layer); drop it from target_modules or from {KEY}")
    lora = [p for p in lora if p not in layers and p not in tied]
    return {**config, "target_modules": sorted(set(lora) | set(layers) | set(tied)), "exclude_modules": None,
            "layers_to_transform": None, LAYERS: layers | tied, TIED: sorted(tied), "token_tables": {}}


def from_file(adapter: AdapterFiles) -> dict[str, Any]:
    """The field of a loaded file, whose tokens modules (among the modules the loader targets) get no LoRA."""
    tokens = sorted(held(adapter))
    return {KEY: adapter.config.get(KEY), **({"exclude_modules": tokens} if tokens else {})}


def on(config: dict[str, Any], path: str) -> bool:
    """Whether `path` is a tokens layer of this adapter (`prepare` chose them)."""
    if config.get(KEY) and LAYERS not in config:
        raise AdaptkitError(f"{KEY}: hot-swapping a LoRA with trainable tokens is not supported; load it anew")
    return path in (config.get(LAYERS) or {})


def settings(config: dict[str, Any], path: str, target) -> dict[str, Any]:
    """The trainable_tokens variant's settings for the layer (T starts at the current rows, as PEFT's), marked."""
    vocab = target.in_features if target.kind == "embedding" else target.out_features
    ids = check_indices(config[LAYERS][path], vocab, f"{path}: {KEY}")
    own = {"token_indices": ids, "init_weights": True, "tied": config[TIED],
           "tables": config["token_tables"]}
    return {**TRAINABLE_TOKENS.settings(own, path, target), "tokens": True}


def create(target, settings: dict[str, Any], weight, trainable_a: bool = True):
    """T, one Parameter per base tensor (a tied head shares its embedding's); LoRA-FA's frozen A is no matter here."""
    return TRAINABLE_TOKENS.create(target, settings, weight, None)


def forward(branch, base_layer, x, result):
    return TRAINABLE_TOKENS.forward(branch, base_layer, x, result)


def weight_delta(branch, weight):
    return TRAINABLE_TOKENS.weight_delta(branch, weight)


def save_tensors(branch) -> dict[str, Any]:
    """T, under the embedding only: a tied head's copy is the same tensor, which PEFT does not save."""
    return {} if branch.settings["tied"] else {ROLE: branch.params[ROLE].detach()}


def file_config(settings: dict[str, dict]) -> dict[str, Any]:
    """{embedding path: ids} for PEFT, and the LoRA's own layers as `target_modules`."""
    chosen = {p: s["token_indices"] for p, s in sorted(settings.items()) if s.get("tokens") and not s["tied"]}
    return {KEY: chosen, "target_modules": sorted(p for p, s in settings.items() if not s.get("tokens"))}


def _named(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)
