"""Calls to the Hub through huggingface_hub: where it is, whether we may reach it, bounded retries,
and its errors turned into one line that says what failed.

huggingface_hub retries every request that fails on the network (`http_backoff`: 5 more tries,
waiting 1, 2, 4, 8, 8 s) and logs each retry as a warning. A connection that cannot be made at all
(refused, a name that does not resolve, a connect timeout) is not worth that: with the Hub down or
HF_ENDPOINT wrong, every command would wait about 23 s per request and print a page of warnings.
So, for the length of each of our calls (`hub_session`), such failures are not retried and the
client's log is kept to errors; 429/5xx answers and connections that break off mid-way keep their
bounded retries. Both settings are put back when the call ends.
"""
from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager

from ..errors import AdaptkitError

REPO_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(@(?P<rev>[\w./-]+))?$")

# Retries of Hub calls on 429/5xx answers and dropped connections: RETRIES more tries, waiting
# BACKOFF·2^k seconds before the k-th (tests make it tiny).
RETRIES = int(os.environ.get("ADAPTKIT_HUB_RETRIES", "3"))
BACKOFF = float(os.environ.get("ADAPTKIT_HUB_BACKOFF", "0.5"))
RETRY_STATUS = {429, 500, 502, 503, 504}
TRANSPORT_ERRORS = {"TransportError", "NetworkError", "ConnectError", "TimeoutException", "RemoteProtocolError",
                    "ConnectionError", "Timeout", "ChunkedEncodingError"}
# No connection could be made: the Hub is down, elsewhere or behind a proxy that refuses; trying again at
# once does not help.
NO_CONNECTION = {"ConnectError", "ConnectTimeout", "ProxyError"}


class HubUnreachable(AdaptkitError):
    """No connection to the Hub could be made; `endpoint` and `why` ("connection refused", ...) say more."""

    def __init__(self, message: str, endpoint: str, why: str):
        super().__init__(message)
        self.endpoint, self.why = endpoint, why


def shown(value, limit: int = 60) -> str:
    """`value` for a one-line message: a short printable string as it is, anything else as a truncated repr."""
    if isinstance(value, str) and len(value) <= limit and value.isprintable():
        return value
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def quoted(value, limit: int = 60) -> str:
    """`value` in quotes for a one-line message ('name'), or its truncated repr when it is no plain string."""
    text = shown(value, limit)
    return f"'{text}'" if text is value else text


def repo_problem(repo) -> str | None:
    """Why `repo` is not a Hub repository id `org/name` (huggingface_hub's own rules), or None if it is one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo, str):
        return f"a repository id is a string, not {type(repo).__name__}"
    if repo.count("/") != 1:
        return "a repository id is org/name"
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        return validation_reason(e)
    return None


def revision_problem(rev) -> str | None:
    """Why `rev` is not a branch, tag or commit name, or None: names are letters, digits, '.', '_', '-'
    in '/'-separated parts, none of them '.' or '..' (huggingface_hub keeps a file per name under refs/)."""
    if not isinstance(rev, str):
        return f"a revision is a string, not {type(rev).__name__}"
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", rev, re.ASCII):
        return "a revision is letters, digits, '.', '_' and '-' in '/'-separated parts"
    if any(part in (".", "..") for part in rev.split("/")):
        return "a revision has no '.' or '..' parts"
    return None


def validation_reason(e: BaseException) -> str:
    """huggingface_hub's validation message without the value it quotes (ours names it, truncated)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.split(r":\s*'", text, maxsplit=1)[0].rstrip(". ")[:160]
    return text[:1].lower() + text[1:]


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


_SESSION = threading.Lock()
_session = {"open": 0, "restore": None}  # sessions open (in any thread); what puts the client back


@contextmanager
def hub_session():
    """huggingface_hub for the length of one of our calls: a connection that cannot be made is not
    retried (its `http_backoff` keeps retrying 429/5xx answers and connections that break off), and its
    log is kept to errors (our error says what failed, in one line). Both are put back when the last
    session open (sessions nest, and may overlap across threads) ends."""
    with _SESSION:
        if _session["open"] == 0:
            _session["restore"] = _quiet_client()
        _session["open"] += 1
    try:
        yield
    finally:
        with _SESSION:
            _session["open"] -= 1
            if _session["open"] == 0:
                _session["restore"]()


def _quiet_client():
    """Set huggingface_hub's connect-retry default and log level for a session; returns what puts them back."""
    from huggingface_hub.utils import http_backoff, http_stream_backoff, logging

    # The retry policy is a keyword default of `http_backoff` (and of the function behind
    # `http_stream_backoff`), which huggingface_hub calls without it: the default is what to change.
    saved = []
    for fn in (http_backoff, getattr(http_stream_backoff, "__wrapped__", None)):
        defaults = getattr(fn, "__kwdefaults__", None) or {}
        if isinstance(defaults.get("retry_on_exceptions"), tuple):
            saved.append((defaults, defaults["retry_on_exceptions"]))
            defaults["retry_on_exceptions"] = _without_connect_errors(defaults["retry_on_exceptions"])
    level = logging.get_verbosity()
    logging.set_verbosity_error()

    def restore() -> None:
        logging.set_verbosity(level)
        for defaults, value in saved:
            defaults["retry_on_exceptions"] = value

    return restore


def _without_connect_errors(classes: tuple[type, ...]) -> tuple[type, ...]:
    """`classes` (an isinstance tuple) minus the connect errors: a class that has one among its subclasses
    (httpx's NetworkError, TimeoutException) gives way to its other subclasses."""
    kept: list[type] = []
    for cls in classes:
        if cls.__name__ in NO_CONNECTION:
            continue
        if any(sub.__name__ in NO_CONNECTION for sub in _subclasses(cls)):
            kept += _without_connect_errors(tuple(cls.__subclasses__()))
        else:
            kept.append(cls)
    return tuple(kept)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def call(fn, *, repo: str | None = None, rev: str | None = None, file: str | None = None, what: str | None = None,
         retries: int | None = None):
    """`fn()` in a `hub_session`, tried again on 429/5xx answers and dropped connections (a few times,
    with backoff), not when no connection can be made; huggingface_hub's errors become one line
    saying what failed."""
    retries = RETRIES if retries is None else retries
    with hub_session():
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


def unreachable(e: BaseException) -> bool:
    """No connection could be made (refused, a name that does not resolve, a connect timeout, a proxy
    that refuses), directly or behind huggingface_hub's LocalEntryNotFoundError."""
    from huggingface_hub import errors

    if isinstance(e, errors.LocalEntryNotFoundError):
        return e.__cause__ is not None and unreachable(e.__cause__)
    return any(c.__name__ in NO_CONNECTION for c in type(e).__mro__)


def transient(e: BaseException) -> bool:
    """A failure worth another try: 429/5xx, a dropped connection, a read timeout (not a connection
    that could not be made: see `unreachable`)."""
    from huggingface_hub import errors

    if isinstance(e, errors.OfflineModeIsEnabled) or unreachable(e):
        return False
    if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
        return e.response.status_code in RETRY_STATUS
    if isinstance(e, errors.LocalEntryNotFoundError):  # hf_hub_download's wrapper of a failed HEAD
        return e.__cause__ is not None and not is_offline() and transient(e.__cause__)
    return any(c.__name__ in TRANSPORT_ERRORS for c in type(e).__mro__)


def why_unreachable(e: BaseException) -> str:
    """'connection refused', 'name or service not known', ...: the last words of the innermost error."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", detail(e))
    return (text[:1].lower() + text[1:]) or type(e).__name__


def detail(e: BaseException) -> str:
    """The last line of an error's message, printable and at most 160 characters."""
    text = (str(e).strip().splitlines() or [""])[-1][:160]
    return "".join(c if c.isprintable() else "?" for c in text) or type(e).__name__


def explain(e: BaseException, *, repo, rev, file, what, tries) -> AdaptkitError | None:
    """One line for a Hub failure (never the token, never a traceback); None for anything else."""
    from huggingface_hub import errors

    at = endpoint()
    target = what or "".join([repo or "the Hub", f"@{rev[:12]}" if rev else "", f": {file}" if file else ""])
    if isinstance(e, errors.OfflineModeIsEnabled) or (isinstance(e, errors.LocalEntryNotFoundError) and is_offline()):
        return AdaptkitError(f"{target}: not in the cache, and HF_HUB_OFFLINE is set")
    if unreachable(e):
        why = why_unreachable(e)
        return HubUnreachable(f"cannot reach the Hub at {at} for {target} ({why}); check HF_ENDPOINT and the "
                              "connection", at, why)
    if isinstance(e, errors.LocalEntryNotFoundError) and e.__cause__ is not None:
        return explain(e.__cause__, repo=repo, rev=rev, file=file, what=what, tries=tries)
    if isinstance(e, errors.HFValidationError):
        return AdaptkitError(f"{target}: refused by huggingface_hub ({validation_reason(e)})")
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
        answer = f"{status} {shown(reason, 40)}".strip()
        if status in RETRY_STATUS:
            return AdaptkitError(f"the Hub at {at} answered {answer} for {target}, {tries} time(s) in a row; "
                                 "try again later")
        if status in (401, 403):
            return AdaptkitError(f"the Hub at {at} refused {target} ({answer}): check your token "
                                 "(HF_TOKEN or `hf auth login`) and its permissions")
        return AdaptkitError(f"the Hub at {at} answered {answer} for {target}")
    if transient(e) or isinstance(e, errors.LocalEntryNotFoundError):
        said = detail(e)
        kinds = {c.__name__ for c in type(e).__mro__}
        if kinds & {"RemoteProtocolError", "ReadTimeout", "ReadError", "ChunkedEncodingError"}:
            return AdaptkitError(f"the connection to the Hub at {at} kept breaking off during {target} ({said}), "
                                 f"{tries} time(s); nothing partial was kept, try again")
        return AdaptkitError(f"cannot reach the Hub at {at} for {target} ({said}); check HF_ENDPOINT and the "
                             "connection, or set HF_HUB_OFFLINE=1 to work from the cache")
    return None
