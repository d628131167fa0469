"""Pictures of what the commands compute (matplotlib, the optional extra `[plot]`, imported only when a picture
is drawn): `figure` checks the target and writes it atomically, `pictures` and `spectrum` make one figure
per picture from plain data, `metrics` reads training's log. Nothing here imports matplotlib or torch at
import time, so a command that draws nothing pays nothing."""
from __future__ import annotations

from .figure import check_target, draw
from .metrics import read_metrics
from .pictures import greedy_figure, merge_figure, quantize_figure, routing_figure, sweep_figure, training_figure
from .spectrum import SERVICE_RANK_CAP, adapter_spectra, energy, spectrum_figure

__all__ = ["SERVICE_RANK_CAP", "adapter_spectra", "check_target", "draw", "energy", "greedy_figure", "merge_figure",
           "quantize_figure", "read_metrics", "routing_figure", "spectrum_figure", "sweep_figure", "training_figure"]
