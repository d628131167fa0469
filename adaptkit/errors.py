"""Errors a user can act on, and the helpers that keep their messages to one readable line.
The CLI prints their message as one line and exits 1."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


class AdaptkitError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name."""


class CorruptFileError(AdaptkitError):
    """A weights file that is truncated or not what its name says."""


class PluginError(AdaptkitError):
    """A plugin that cannot be found, imported or trusted."""


class UnsupportedError(AdaptkitError):
    """A well-formed input that names a feature adaptkit does not implement (refused rather than misread):
    `inspect` still describes it, with this as its reason."""


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name nearest to `name` (for 'did you mean' hints), or None."""
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_name(what: str, name: str, known: Iterable[str]) -> AdaptkitError:
    """An error for an unknown name that lists the known ones and suggests the closest."""
    known = sorted(known)
    hint = closest(name, known)
    suggestion = f"; did you mean '{hint}'?" if hint else ""
    listing = ", ".join(known) if known else "none"
    return AdaptkitError(f"unknown {what} '{name}'{suggestion} (known: {listing})")


def short(value: Any, limit: int = 60) -> str:
    """A value as a message may show it: scalars by repr (cut at `limit`), containers by their size."""
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)} key(s)"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit])
        return text if len(value) <= limit else text + "…"
    if isinstance(value, int) and value.bit_length() > 200:  # repr of a huge int is slow, or refused
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value) if isinstance(value, (bool, int, float, type(None))) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def printable(text: str, limit: int = 80) -> str:
    """A name read from a file, fit for a one-line message: control characters escaped, cut at `limit`."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "…"
