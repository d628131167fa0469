"""Merging (the tensor plane): recipes in mergekit's format (`recipe`), inputs read tensor by tensor with
adapters added on the fly (`sources`), the streaming engine that writes a model (`engine`), merging
adapters into an adapter (`to_adapter`), the output's card (`card`), multi-stage recipes (`multi`),
model soups (`soup`), mixtures of experts (`moe`), random frankenmerges (`layershuffle`) and another
model's tokenizer (`tokensurgeon`). The methods are merge plugins."""

import importlib

#: A recipe's `tensors:` (adaptkit's name for mergekit-pytorch's --tensor-union and --tensor-intersection): which
#: tensors a merge of inputs holding different sets writes (sources.py `merge_names`); without it the sets must
#: be equal. Here, where the command line reads it without importing the recipe reader.
TENSOR_SETS = ("union", "intersection")

# The public functions, imported on first use (they need torch; the submodules stay importable alone).
_EXPORTS = {'run_merge': '.engine', 'Plan': '.engine', 'load_recipe': '.recipe', 'merge_adapters': '.to_adapter',
            'run_stages': '.multi', 'build_moe': '.moe', 'load_moe_config': '.moe', 'surgery': '.tokensurgeon',
            'SurgeryOptions': '.tokensurgeon', 'run_layershuffle': '.layershuffle'}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ['Plan', 'SurgeryOptions', 'build_moe', 'card', 'engine', 'layershuffle', 'load_moe_config', 'load_recipe',
           'merge_adapters', 'moe', 'multi', 'recipe', 'run_layershuffle', 'run_merge', 'run_stages', 'slices', 'soup',
           'sources', 'surgery', 'to_adapter', 'tokenizer', 'tokensurgeon']
