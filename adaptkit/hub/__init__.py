"""The Hugging Face Hub, through huggingface_hub only: references (`org/name[@rev]`, lock names), pull
and sync (`repos`), push (`upload`), search by tags (`find`), verified files in the shared HF cache
(`cache`), `adaptkit.lock` (`lockfile`), model cards (`card`), and the client's retries and errors
(`client`). `ak.hub.pull(...)`, `ak.hub.search(...)` and the rest are re-exported here."""
from .find import default_tags, search
from .repos import (download, is_hub_ref, is_reference, lock_entry, locked_folder, parse_ref, pull, ref_problem,
                    remote_adapter_files, resolve, resolve_commit, resolve_path, sync)
from .upload import push

__all__ = ["default_tags", "download", "is_hub_ref", "is_reference", "lock_entry", "locked_folder", "parse_ref", "pull",
           "push", "ref_problem", "remote_adapter_files", "resolve", "resolve_commit", "resolve_path", "search", "sync"]
