"""`adaptkit plugins` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .. import registry
from ..errors import AdaptkitError
from .options import CONTEXT, JSON, emit_json


@click.command(context_settings=CONTEXT)
@click.option("--kind", type=click.Choice(registry.KINDS), help="Only plugins of this kind.")
@click.option("--check", is_flag=True, help="Import every plugin and report those that fail to load.")
@JSON
def plugins(kind, check, as_json):
    """List the registered plugins: built-ins and those installed by other packages.

    Listing imports no plugin; --check imports each one and marks the broken ones. --json prints a
    list (keys: name, kind, source, description, status).

    \b
    Examples:
      adaptkit plugins
      adaptkit plugins --kind merge
      adaptkit plugins --check --json
    """
    rows = []
    for e in registry.entries(kind):
        description, problem = registry.describe(e)
        if check and problem is None:
            try:
                registry.get(e.kind, e.name)
            except AdaptkitError as exc:
                problem = str(exc)
        rows.append({"name": e.name, "kind": e.kind, "source": e.source, "description": description,
                     "status": f"broken: {problem}" if problem else ("ok" if check else "listed")})
    if as_json:
        return emit_json(rows)
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        mark = f"  [{r['status']}]" if r["status"].startswith("broken") else ""
        source = "" if r["source"] == registry.BUILTIN else f"  ({r['source']})"
        click.echo(f"{r['kind']:<9} {r['name']:<{width}}  {r['description']}{source}{mark}")
