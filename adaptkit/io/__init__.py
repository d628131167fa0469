"""Bytes on disk, trusted only once checked: tensor stores (safetensors files and sharded folders; pickles
only when allowed), bounded JSON and YAML readers, paths kept inside their folder, element types,
sharded writers, and outputs that appear whole or not at all. Nothing here knows adapters or plugins."""
from .store import PICKLE_SUFFIXES, WEIGHT_SUFFIXES, TensorStore, open_store, pickle_refusal

__all__ = ["PICKLE_SUFFIXES", "WEIGHT_SUFFIXES", "TensorStore", "open_store", "pickle_refusal"]
