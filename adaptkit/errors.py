"""Errors a user can act on. The CLI prints their message as one line and exits 1."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdaptkitError(Exception):
    """A user-facing error: bad input, a missing file, an unknown name."""


class CorruptFileError(AdaptkitError):
    """A weights file that is truncated or not what its name says."""


class PluginError(AdaptkitError):
    """A plugin that cannot be found, imported or trusted."""


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
