"""The Hugging Face Hub, through huggingface_hub only: references `org/name[@rev]` -> local snapshots."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import AdaptkitError

REPO_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(@(?P<rev>[\w./-]+))?$")
# Only what loading needs: weights, configs, tokenizers, model cards.
WANTED = ["*.safetensors", "*.json", "*.model", "*.txt", "*.md", "tokenizer*"]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); anything else is an error."""
    m = REPO_REF.match(ref)
    if not m:
        raise AdaptkitError(f"{ref}: no such file or folder, and not a Hub reference (org/name[@revision])")
    return m.group("repo"), m.group("rev")


def download(ref: str) -> Path:
    """Fetch (or find in the HF cache) the files of `org/name[@rev]`; returns the snapshot folder."""
    repo, revision = parse_ref(ref)
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=WANTED))
    except errors.RevisionNotFoundError:
        raise AdaptkitError(f"{ref}: revision '{revision}' not found in {repo}") from None
    except errors.RepositoryNotFoundError:
        raise AdaptkitError(f"{ref}: no such file or folder, and no Hub repository '{repo}'") from None
    except (errors.LocalEntryNotFoundError, OSError) as e:
        raise AdaptkitError(f"{ref}: not a local path, and the Hub cannot be reached ({type(e).__name__})") from None
