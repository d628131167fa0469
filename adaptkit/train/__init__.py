"""Training and evaluating adapters of any variant: the loop (`loop`), resumable run folders
(`checkpoint`), several processes (`distributed`), JSON-lines data (`data`), building the model and
tokenizer (`models`), evaluation (`evaluation`) and text generation (`generation`). Variants plug in
through the handle's hooks; nothing here names one."""

import importlib

# The public functions, imported on first use (they need torch; the submodules stay importable alone).
_EXPORTS = {'train': '.loop', 'evaluate': '.evaluation', 'scorer': '.evaluation', 'generate': '.generation'}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ['checkpoint', 'data', 'distributed', 'evaluate', 'evaluation', 'generate', 'generation', 'loop', 'models', 'scorer', 'train']
