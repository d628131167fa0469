"""Several adapters on one model in one pass, each on its own block of rows (ensembles).

    with by_rows(handle, ["a", "b"], rows=4):
        out = model(input_ids=torch.cat([ids, ids]))    # rows 0-3 ran with adapter a alone, rows 4-7 with b

Every adapted layer and every module trained whole (modules_to_save) gets a `layer.Routes`: the
base layer runs once over all rows and each block of rows gets only its adapter's branch, so N
adapters cost one base model and one pass over N times the rows, not N models or N passes.

Only what acts per row can be routed this way; the rest is refused by name before anything runs:
adapters that rewrite the model's call (virtual tokens, a prefix cache change the sequence for
every row) or read the model's inputs, branches on whole blocks (an activation-space variant) or
on tensors a module reads itself, a layer under quantization-aware training, merged or disabled
adapters, and an adapter with a part inside the base weight (that part would reach every row).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .. import spec
from ..errors import AdaptkitError, unknown_name
from .layer import ROUTED_KINDS, AdaptedLayer, ReplacedModule, Routes
from .targets import adapted_layers

if TYPE_CHECKING:
    from .adapters import Adapters


@contextlib.contextmanager
def by_rows(handle: Adapters, names: Sequence[str], rows: int) -> Iterator[None]:
    """Within the block, a call on len(names) × rows rows runs adapter names[i] alone on block i."""
    names = tuple(names)
    if rows < 1 or not names:
        raise AdaptkitError("routing by rows needs at least one adapter and one row per adapter")
    for name in names:
        check_routable(handle, name)
    modules = [m for m in handle.model.modules() if isinstance(m, (AdaptedLayer, ReplacedModule))]
    busy = next((m.path for m in modules if m.routes is not None), None)
    if busy is not None:
        raise AdaptkitError(f"{busy}: already routed by rows; routing does not nest")
    routes = Routes(names, rows)
    try:
        for module in modules:
            module.routes = routes
        yield
    finally:
        for module in modules:
            module.routes = None


def check_routable(handle: Adapters, name: str) -> None:
    """Refuse, naming the adapter and layer, what cannot act on its own block of rows."""
    if name not in handle.adapters:
        raise unknown_name("adapter", name, handle.adapters)
    adapter = handle.adapters[name]
    variant = adapter.variant
    if isinstance(variant, spec.RewritesCall):
        raise AdaptkitError(f"adapter '{name}' ({variant.name}) changes the model's call itself (virtual tokens, a "
                            "prefix cache) for every row; it cannot share one pass with other adapters")
    if isinstance(variant, spec.ReadsInputs) and variant.reads_inputs(adapter.config):
        raise AdaptkitError(f"adapter '{name}' ({variant.name}) reads the model's inputs to decide where it acts; "
                            "it cannot share one pass with other adapters")
    layers = adapted_layers(handle.model)
    for path in adapter.layers:
        layer = layers[path]
        if layer.target.kind not in ROUTED_KINDS or layer.target.tensors:
            raise AdaptkitError(f"{path}: adapter '{name}' ({variant.name}) acts on a whole {layer.target.kind} "
                                f"there, which cannot be routed by rows (only {', '.join(ROUTED_KINDS)} layers)")
        if layer.disabled or name in layer.merged:
            raise AdaptkitError(f"{path}: adapter '{name}' is {'disabled' if layer.disabled else 'merged'}; "
                                "enable / unmerge it before routing by rows")
        if layer.fake_quant is not None:
            raise AdaptkitError(f"{path}: quantization-aware training computes with the merged weight; turn it "
                                "off before routing by rows")
        if layer.resident(name) is not None:
            raise AdaptkitError(f"{path}: part of adapter '{name}' lives inside the base weight, which every row "
                                "shares; it cannot be routed by rows")
    for path in adapter.saved:
        if handle.model.get_submodule(path).disabled:
            raise AdaptkitError(f"{path}: adapters are disabled; enable them before routing by rows")
