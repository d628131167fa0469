"""A quantized model read as a floating-point one: merges into a quantized base (QLoRA's base plus
its adapter) see every packed weight as the tensor it stands for.

Packed tensors follow `adaptkit quantize`'s (and bitsandbytes') naming: a weight `a.b.weight` is
stored as `a.b.weight` plus statistics `a.b.weight.<stat>`. The unpacked tensor is reported as
bfloat16 (the dtype merges write by default; `--dtype` chooses another); its shape comes from the
quantizer's `unpacked_shape` when the plugin has one (headers and small tensors only), else from
unpacking it once.
"""
from __future__ import annotations

from dataclasses import replace

from .. import registry, spec
from ..errors import AdaptkitError, CorruptFileError
from ..errors import printable
from ..io.store import TensorStore

UNPACKED_DTYPE = "BF16"


def detect_quantizer(store: TensorStore) -> str | None:
    """The name of the quantizer plugin whose layout `store` has, or None (headers only)."""
    return registry.detect("quantizer", store)


def packed_groups(store: TensorStore) -> dict[str, dict[str, str]]:
    """Stored name -> {plugin key: stored key} for every packed tensor: a key K with keys K.<stat>."""
    keys = set(store.keys())
    groups: dict[str, dict[str, str]] = {}
    for key in store.keys():
        head, _, _ = key.rpartition(".")
        while head:
            if head in keys:
                groups.setdefault(head, {"weight": head})["weight" + key[len(head):]] = key
                break
            head, _, _ = head.rpartition(".")
    return groups


class UnpackedStore(TensorStore):
    """`store` with each packed group replaced by one floating tensor, unpacked on demand."""

    def __init__(self, store: TensorStore, method: str):
        self.inner, self.method = store, method
        self.quantizer = registry.get("quantizer", method)
        self.groups = packed_groups(store)
        hidden = {k for group in self.groups.values() for k in group.values()}
        infos = {}
        for key in store.keys():
            if key in self.groups:
                infos[key] = replace(store.info(key), dtype=UNPACKED_DTYPE, shape=self._shape(key))
            elif key not in hidden:
                infos[key] = store.info(key)
        super().__init__(store.root, infos, store.metadata, index=store.index)
        self.lone = store.lone

    def _packed(self, name: str) -> dict:
        return {key: self.inner.get(stored) for key, stored in self.groups[name].items()}

    def _shape(self, name: str) -> tuple[int, ...]:
        group = self.groups[name]
        if isinstance(self.quantizer, spec.UnpackedShape):
            hook = self.quantizer.unpacked_shape
            shapes = {key: tuple(self.inner.info(stored).shape) for key, stored in group.items()}
            shape = tuple(self._unpack(name, lambda: hook(shapes, lambda key: self.inner.get(group[key]))))
        else:
            shape = tuple(self._unpack(name, lambda: self.quantizer.dequantize(self._packed(name))).shape)
        if not all(type(d) is int and d >= 0 for d in shape):  # e.g. a stored shape tensor of floats
            raise CorruptFileError(f"{self.inner.root}: cannot unpack '{name}': its packed tensors give the shape "
                                   f"{printable(str(shape), 60)}")
        return shape

    def _unpack(self, name: str, compute):
        """`compute()` on the packed tensors of `name`, its faults one line naming the tensor: packed
        tensors from a file we did not write may not fit together (a cut code table, a float where
        the quantizer needs an index), and the quantizer then fails inside torch."""
        try:
            return compute()
        except AdaptkitError as e:
            raise AdaptkitError(f"{self.inner.root}: cannot unpack '{name}': {e}") from None
        except (IndexError, RuntimeError, TypeError, ValueError) as e:
            reason = (str(e).splitlines() or [""])[0][:100]
            raise CorruptFileError(f"{self.inner.root}: cannot unpack '{name}' from its packed tensors "
                                   f"({type(e).__name__}: {reason})") from None

    def packed(self, name: str) -> bool:
        return name in self.groups

    def get(self, name: str, rows: tuple[int, int] | None = None):
        if name not in self.groups:
            return self.inner.get(name, rows=rows)
        tensor = self._unpack(name, lambda: self.quantizer.dequantize(self._packed(name)).float())
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def close(self) -> None:
        self.inner.close()


def open_unpacked(store: TensorStore) -> TensorStore:
    """`store` itself, or an `UnpackedStore` over it when its weights are quantized."""
    method = detect_quantizer(store)
    return store if method is None else UnpackedStore(store, method)
