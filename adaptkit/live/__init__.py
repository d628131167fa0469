"""Adapters on a live `torch.nn` model (the module plane): the `Adapters` handle (`adapters`), the one
adapted-layer wrapper (`layer`), choosing and wrapping target layers (`targets`), and saving a live
adapter through a format plugin or loading a saved one onto the model (`files`); several adapters run
on their own blocks of rows in one pass (`routing`) and their outputs combined (`ensembles`)."""

__all__ = ["adapters", "ensembles", "files", "layer", "routing", "targets"]
