"""Merging (the tensor plane): recipes in mergekit's format (`recipe`), inputs read tensor by tensor with
adapters added on the fly (`sources`), the streaming engine that writes a model (`engine`), merging
adapters into an adapter (`to_adapter`) and model soups (`soup`). The methods are merge plugins."""

__all__ = ["engine", "recipe", "soup", "sources", "to_adapter"]
