"""Training and evaluating adapters of any variant: the loop (`loop`), resumable run folders
(`checkpoint`), JSON-lines data (`data`), building the model and tokenizer (`models`) and evaluation
(`evaluation`). Variants plug in through the handle's hooks; nothing here names one."""

import importlib

# The public functions, imported on first use (they need torch; the submodules stay importable alone).
_EXPORTS = {'train': '.loop', 'evaluate': '.evaluation', 'scorer': '.evaluation'}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ['checkpoint', 'data', 'evaluate', 'evaluation', 'loop', 'models', 'scorer', 'train']
