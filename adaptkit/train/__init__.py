"""Training and evaluating adapters of any variant: the loop (`loop`), resumable run folders
(`checkpoint`), JSON-lines data (`data`), building the model and tokenizer (`models`) and evaluation
(`evaluate`). Variants plug in through the handle's hooks; nothing here names one."""

__all__ = ["checkpoint", "data", "evaluate", "loop", "models"]
