"""Calls to the Hub through huggingface_hub: where it is, whether we may reach it, bounded retries,
and its errors turned into one line that says what failed."""
from __future__ import annotations

import os
import re
import time

from .errors import AdaptkitError

REPO_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(@(?P<rev>[\w./-]+))?$")

# Retries of Hub calls on 429/5xx answers and dropped connections: RETRIES more tries, waiting
# BACKOFF·2^k seconds before the k-th (tests make it tiny).
RETRIES = int(os.environ.get("ADAPTKIT_HUB_RETRIES", "3"))
BACKOFF = float(os.environ.get("ADAPTKIT_HUB_BACKOFF", "0.5"))
RETRY_STATUS = {429, 500, 502, 503, 504}
TRANSPORT_ERRORS = {"TransportError", "NetworkError", "ConnectError", "TimeoutException", "RemoteProtocolError",
                    "ConnectionError", "Timeout", "ChunkedEncodingError"}


def endpoint() -> str:
    """The Hub's address: `HF_ENDPOINT` as it is now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """`HF_HUB_OFFLINE` set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def api():
    """A huggingface_hub client for the current endpoint (its token: HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def call(fn, *, repo: str | None = None, rev: str | None = None, file: str | None = None, what: str | None = None,
         retries: int | None = None):
    """`fn()`, tried again on 429/5xx answers and dropped connections (a few times, with backoff);
    huggingface_hub's errors become one line saying what failed."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return fn()
        except AdaptkitError:
            raise
        except Exception as e:
            if transient(e) and attempt < retries:
                time.sleep(BACKOFF * 2**attempt)
                continue
            explained = explain(e, repo=repo, rev=rev, file=file, what=what, tries=attempt + 1)
            if explained is None:
                raise
            raise explained from None


def transient(e: BaseException) -> bool:
    """A failure worth another try: 429/5xx, a refused or dropped connection, a timeout."""
    from huggingface_hub import errors

    if isinstance(e, errors.OfflineModeIsEnabled):
        return False
    if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
        return e.response.status_code in RETRY_STATUS
    if isinstance(e, errors.LocalEntryNotFoundError):  # hf_hub_download's wrapper of a failed HEAD
        return e.__cause__ is not None and not is_offline() and transient(e.__cause__)
    return any(c.__name__ in TRANSPORT_ERRORS for c in type(e).__mro__)


def explain(e: BaseException, *, repo, rev, file, what, tries) -> AdaptkitError | None:
    """One line for a Hub failure (never the token, never a traceback); None for anything else."""
    from huggingface_hub import errors

    at = endpoint()
    target = what or "".join([repo or "the Hub", f"@{rev[:12]}" if rev else "", f": {file}" if file else ""])
    if isinstance(e, errors.OfflineModeIsEnabled) or (isinstance(e, errors.LocalEntryNotFoundError) and is_offline()):
        return AdaptkitError(f"{target}: not in the cache, and HF_HUB_OFFLINE is set")
    if isinstance(e, errors.LocalEntryNotFoundError) and e.__cause__ is not None:
        return explain(e.__cause__, repo=repo, rev=rev, file=file, what=what, tries=tries)
    if isinstance(e, errors.GatedRepoError):
        return AdaptkitError(f"{repo} is gated: accept its conditions on the Hub, then use a token "
                             "(HF_TOKEN or `hf auth login`)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return AdaptkitError(f"no Hub repository '{repo}' at {at} (private and gated ones need a token: "
                             "HF_TOKEN or `hf auth login`)")
    if isinstance(e, errors.RevisionNotFoundError):
        return AdaptkitError(f"{repo} has no revision '{rev}' (a branch, tag or commit) on the Hub")
    if isinstance(e, getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)) and not isinstance(
            e, errors.LocalEntryNotFoundError):
        return AdaptkitError(f"{repo}@{(rev or 'main')[:12]} has no file '{file}' on the Hub")
    if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        reason = getattr(e.response, "reason_phrase", None) or getattr(e.response, "reason", "") or ""
        answer = f"{status} {reason}".strip()
        if status in RETRY_STATUS:
            return AdaptkitError(f"the Hub at {at} answered {answer} for {target}, {tries} time(s) in a row; "
                                 "try again later")
        if status in (401, 403):
            return AdaptkitError(f"the Hub at {at} refused {target} ({answer}): check your token "
                                 "(HF_TOKEN or `hf auth login`) and its permissions")
        return AdaptkitError(f"the Hub at {at} answered {answer} for {target}")
    if transient(e) or isinstance(e, errors.LocalEntryNotFoundError):
        detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160] or type(e).__name__
        kinds = {c.__name__ for c in type(e).__mro__}
        if kinds & {"RemoteProtocolError", "ReadTimeout", "ReadError", "ChunkedEncodingError"}:
            return AdaptkitError(f"the connection to the Hub at {at} kept breaking off during {target} ({detail}), "
                                 f"{tries} time(s); nothing partial was kept, try again")
        return AdaptkitError(f"cannot reach the Hub at {at} for {target} ({detail}); check HF_ENDPOINT and the "
                             "connection, or set HF_HUB_OFFLINE=1 to work from the cache")
    return None
