"""Example third-party plugins for adaptkit: the `median` merge method and the `outer` variant.

Nothing here is imported until adaptkit needs a plugin (`registry.get`); listing the plugins
(`adaptkit plugins`) reads only the entry points and the docstrings.
"""
__version__ = "0.1.0"
