"""`adaptkit hub search|pull|sync|push` (the group is added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from ..hub.lockfile import LOCK_FILE
from .boundary import Group
from .options import ALLOW_PICKLE, CONTEXT, JSON, emit_json, option


def _lock_option(f):
    return click.option("--lock", default=LOCK_FILE, show_default=True, type=click.Path(dir_okay=False),
                        help="The lock file.")(f)


@click.group(cls=Group, context_settings=CONTEXT)
def hub():
    """Find adapters on the Hugging Face Hub, pull them pinned into adaptkit.lock, sync, push.

    A pulled adapter is used by its lock name (or org/name[@rev]) wherever a path is accepted:
    merge recipes and -m, inspect, convert, train --base. HF_ENDPOINT and HF_HUB_OFFLINE=1 are
    honoured; tokens come from HF_TOKEN or `hf auth login` and are never printed.

    \b
    Examples:
      adaptkit hub search llama --base-model meta-llama/Llama-3.2-1B --sort likes
      adaptkit hub pull org/my-lora@v1.0 --name my-lora
      adaptkit merge --base meta-llama/Llama-3.2-1B -m my-lora -o merged/
      adaptkit hub sync --update
      adaptkit hub push ./my-lora me/my-lora --private
    """


@hub.command(context_settings=CONTEXT)
@click.argument("query", required=False)
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Repeatable; a repo with any of them is listed (default: lora, peft, adapter).")
@click.option("--base-model", help="Only adapters of this base model (its `base_model:` tag).")
@click.option("--author", help="Only repositories of this user or organization.")
@click.option("--sort", type=click.Choice(["downloads", "likes", "updated"]), default="downloads", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many to list.")
@JSON
def search(query, tags, base_model, author, sort, limit, as_json):
    """Search the Hub for adapters: by words in their id, tags, base model and author.

    --json prints a list (keys: repo, variant, base_model, downloads, likes, updated, tags).

    \b
    Examples:
      adaptkit hub search
      adaptkit hub search french --base-model meta-llama/Llama-3.2-1B --sort likes --limit 5
      adaptkit hub search --tag lora --author my-org --json
    """
    from ..hub import search as run

    rows = run(query, tags=tags or None, base_model=base_model, author=author, sort=sort, limit=limit)
    if as_json:
        return emit_json(rows)
    if not rows:
        click.echo("no adapters found")
        return
    table = [("repo", "variant", "base model", "downloads", "likes", "updated")]
    table += [(r["repo"], r["variant"] or "-", r["base_model"] or "-", f"{r['downloads']:,}", f"{r['likes']:,}",
               (r["updated"] or "-")[:10]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


@hub.command(context_settings=CONTEXT)
@click.argument("ref", metavar="REPO[@REV]")
@click.option("--name", help="The name to pin it under (default: the repository's name).")
@_lock_option
@JSON
@ALLOW_PICKLE
@click.pass_context
def pull(ctx, ref, name, lock, as_json, allow_pickle):
    """Download an adapter (config, weights, card) into the HF cache and pin it in adaptkit.lock.

    Each file's size and hash are checked against the Hub's; the entry records the commit and
    every file's sha256. REV is a branch, tag or commit (default: main); a commit pins for good.
    --json prints the lock entry and what was downloaded.

    \b
    Examples:
      adaptkit hub pull org/my-lora
      adaptkit hub pull org/my-lora@v1.0 --name my-lora
      adaptkit hub pull org/my-lora@0123456789abcdef0123456789abcdef01234567 --json
    """
    from ..hub import pull as run

    report = run(ref, name=name, lock=lock, progress=not (ctx.obj or {}).get("quiet"), allow_pickle=allow_pickle)
    if as_json:
        return emit_json(report)
    files = report["files"]
    fetched = f"{len(report['downloaded'])} downloaded" if report["downloaded"] else "all already in the cache"
    kind = ", ".join(x for x in (report["variant"], report["base_model"] and f"base {report['base_model']}") if x)
    click.echo(f"pulled {report['repo']}@{report['commit'][:7]} as '{report['name']}'"
               f"{f' ({kind})' if kind else ''}: {len(files)} file(s), {fetched}; pinned in {report['lock']}")


@hub.command(context_settings=CONTEXT)
@click.option("--update", is_flag=True, help="Move unpinned entries (a branch or tag) to the newest commit.")
@click.option("--offline", is_flag=True, help="Verify from the cache alone (also when HF_HUB_OFFLINE=1).")
@_lock_option
@JSON
@ALLOW_PICKLE
@click.pass_context
def sync(ctx, update, offline, lock, as_json, allow_pickle):
    """Re-resolve, download and verify every adapter in adaptkit.lock.

    Files missing from the cache are downloaded, and every file is checked against the lock's
    sha256 (a bad one is fetched again). --update moves unpinned entries to their revision's
    newest commit and shows the file diff; --offline says what the cache lacks. Exits 1 when
    something is missing or corrupt. --json keys: lock, offline, ok, entries.

    \b
    Examples:
      adaptkit hub sync
      adaptkit hub sync --update
      HF_HUB_OFFLINE=1 adaptkit hub sync --json
    """
    from ..hub import sync as run

    report = run(update=update, offline=offline, lock=lock, progress=not (ctx.obj or {}).get("quiet"),
                 allow_pickle=allow_pickle)
    if as_json:
        emit_json(report)
    else:
        for row in report["entries"]:
            click.echo(_sync_line(row, update))
        if not report["entries"]:
            click.echo(f"{report['lock']} pins no adapters")
    if not report["ok"]:
        bad = [r["name"] for r in report["entries"] if r["status"] == "incomplete"]
        click.echo(f"error: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} incomplete "
                   f"({', '.join(bad)}){'; run `adaptkit hub sync` online' if report['offline'] else ''}", err=True)
        ctx.exit(1)


def _sync_line(row: dict, update: bool) -> str:
    head = f"{row['status']:<10} {row['name']}  {row['repo']}@{row['commit'][:7]}"
    notes = []
    if row["diff"] is not None:
        d = row["diff"]
        changes = [f"+{p}" for p in d["added"]] + [f"~{p}" for p in d["changed"]] + [f"-{p}" for p in d["removed"]]
        notes.append(f"moved from {row['revision']}'s old commit: {' '.join(changes) or 'no file changes'}")
    elif row["latest"] and row["latest"] != row["commit"]:
        notes.append(f"{row['revision']} is now at {row['latest'][:7]}"
                     + ("" if row["pinned"] else " (adaptkit hub sync --update)"))
    for key, label in (("downloaded", "downloaded"), ("repaired", "re-fetched (bad hash)"),
                       ("missing", "missing from the cache"), ("corrupt", "corrupt in the cache")):
        if row[key]:
            notes.append(f"{label}: {', '.join(row[key])}")
    return head + (f"  {'; '.join(notes)}" if notes else "")


@hub.command(context_settings=CONTEXT)
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository private.")
@option("--message", old=("-m",), help="Commit message.")
@JSON
@ALLOW_PICKLE
def push(folder, repo, private, message, as_json, allow_pickle):
    """Upload an adapter folder with a generated model card (base model, variant, rank; tags peft, lora, adaptkit).

    The repository is created if needed; a README.md already in DIR keeps its text. --json keys:
    repo, commit, url, files, private.

    \b
    Examples:
      adaptkit hub push ./my-lora me/my-lora
      adaptkit hub push ./my-lora my-org/my-lora --private --message "rank 16, 3 epochs"
    """
    from ..hub import push as run

    report = run(folder, repo, private=private, message=message, allow_pickle=allow_pickle)
    if as_json:
        return emit_json(report)
    click.echo(f"pushed {len(report['files'])} file(s) to {report['repo']}@{report['commit'][:7]}"
               f"{' (private)' if private else ''}: {report['url']}")
