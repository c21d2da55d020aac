"""The DICOMweb connection: credentials from the environment, bounded retries, failures as one clean line.

Credentials are read from the environment only (the operator fills it from a Kubernetes Secret):
MMAR_DICOMWEB_USERNAME + MMAR_DICOMWEB_PASSWORD (HTTP basic) or MMAR_DICOMWEB_TOKEN (bearer). They ride
on the requests Session (never in a URL: a URL with user:password@ is refused, since URLs end up in
error messages). A server's own words are never repeated as they came: an HTTP error is reported by its
status code and the standard phrase for it (not the reason phrase the server sent, which a hostile or
careless server fills with the request's Authorization header), and everything else shown that came from
the server (series descriptions, a `Warning` header) or from a library passes through `redact`, which
removes every form of the secret: the raw user name, password and token, the `Basic <base64>` header
value and the base64 itself, and anything after `Basic ` / `Bearer `. `errors_redacted` is the last net
around a whole command.

Searches (QIDO-RS) are paged here, not by dicomweb-client (whose loop asks for the next page until one is
empty, with no limit: a server that ignores `offset` keeps it asking forever): at most
MMAR_DICOMWEB_MAX_PAGES pages (default 1000) and MMAR_DICOMWEB_SEARCH_TIMEOUT seconds (default 600) per
search, and a page that repeats an earlier one stops it, each with an error naming the search.

A server that is down, overloaded (5xx, 408, 429) or unreachable is retried with exponential back-off
(MMAR_DICOMWEB_RETRIES retries, default 4, the first wait MMAR_DICOMWEB_BACKOFF seconds, default 1, then
doubling: 1+2+4+8 = 15 s at most by default), then reported as one line naming the URL and what failed.
401/403 is not retried: the same credentials will not start working.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from mmar.errors import MMARError

ENV_USERNAME, ENV_PASSWORD, ENV_TOKEN = "MMAR_DICOMWEB_USERNAME", "MMAR_DICOMWEB_PASSWORD", "MMAR_DICOMWEB_TOKEN"
ENV_RETRIES, ENV_BACKOFF, ENV_TIMEOUT = "MMAR_DICOMWEB_RETRIES", "MMAR_DICOMWEB_BACKOFF", "MMAR_DICOMWEB_TIMEOUT"
ENV_MAX_PAGES, ENV_SEARCH_TIMEOUT = "MMAR_DICOMWEB_MAX_PAGES", "MMAR_DICOMWEB_SEARCH_TIMEOUT"
MAX_PAGES, SEARCH_TIMEOUT = 1000, 600.0
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}
AUTH_STATUS = {401, 403}


class PacsError(MMARError):
    """A DICOMweb request failed; the message names the server and the request, never a credential."""


class NotFound(PacsError):
    """The server answered 404 for a study, series or instance."""


class BadAnswer(PacsError):
    """The server's answer to one request could not be read (not DICOM JSON, a broken multipart message)."""


class Refused(PacsError):
    """The server refused this one request (HTTP 4xx other than 401/403/404, or a STOW-RS failure): another
    request (another SEG) may still succeed, unlike a server that is down or credentials that are wrong."""


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every form in which a credential can come back: the raw values, percent-encoded, and the basic
        `Authorization` header's base64 of `user:password` (with and without its `=` padding, as requests
        encodes it and as UTF-8). A user name of one or two characters is left out (it would blank out half
        of every message); a password or token of any length is not."""
        raw = [v for v in (self.password, self.token) if v]
        if self.username and len(self.username) >= 3:
            raw.append(self.username)
        forms = set(raw) | {quote(v, safe="") for v in raw}
        if self.username and self.password:
            pair = f"{self.username}:{self.password}"
            for encoding in ("latin-1", "utf-8"):
                try:
                    encoded = base64.b64encode(pair.encode(encoding)).decode("ascii")
                except UnicodeEncodeError:
                    continue
                forms |= {encoded, encoded.rstrip("="), quote(encoded, safe="")}
        return tuple(sorted((f for f in forms if f), key=len, reverse=True))

    @property
    def kind(self) -> str:
        return "bearer token" if self.token else "basic" if self.username else "none"


def credentials_from_env(environ: dict[str, str] | None = None) -> Credentials:
    env = os.environ if environ is None else environ
    username, password, token = (env.get(k) or None for k in (ENV_USERNAME, ENV_PASSWORD, ENV_TOKEN))
    if token and (username or password):
        raise PacsError(f"set either {ENV_TOKEN} (bearer) or {ENV_USERNAME} + {ENV_PASSWORD} (basic), not both")
    if bool(username) != bool(password):
        missing = ENV_PASSWORD if username else ENV_USERNAME
        raise PacsError(f"{missing} is not set: HTTP basic authentication needs both {ENV_USERNAME} and {ENV_PASSWORD}")
    return Credentials(username, password, token)


def clean_url(url: str) -> str:
    """The service URL, checked: http(s), a host, no user:password@ (URLs are printed in errors)."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    shown = urlunsplit((parts.scheme, host + (f":{parts.port}" if _port(parts) else ""), parts.path, "", ""))
    if parts.username is not None or parts.password is not None:
        raise PacsError(f"--url {shown}: credentials in the URL are not accepted (URLs are logged); set "
                        f"{ENV_USERNAME} + {ENV_PASSWORD} or {ENV_TOKEN} instead")
    if parts.scheme not in ("http", "https") or not host:
        raise PacsError(f"--url {url!r}: not an http(s) URL of a DICOMweb service (e.g. https://pacs/dicom-web)")
    if parts.query or parts.fragment:
        raise PacsError(f"--url {shown}: the service URL takes no query string")
    return shown.rstrip("/")


def _port(parts) -> int | None:
    try:
        return parts.port
    except ValueError:
        raise PacsError(f"--url: invalid port in {parts.scheme}://{parts.hostname}") from None


@dataclass
class Retry:
    retries: int = 4
    backoff: float = 1.0  # the first wait, seconds; doubled each time

    @classmethod
    def from_env(cls) -> Retry:
        return cls(retries=_env_number(ENV_RETRIES, int, 4), backoff=_env_number(ENV_BACKOFF, float, 1.0))

    def waits(self) -> list[float]:
        return [self.backoff * 2**k for k in range(self.retries)]


def _env_number(name: str, kind, default):
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise PacsError(f"{name}={raw!r}: expected a {'whole ' if kind is int else ''}number") from None
    if value < 0:
        raise PacsError(f"{name}={raw!r}: must not be negative")
    return value


# in what a server sent: whatever follows an auth scheme name (a header echoed back, even cut short or with
# someone else's credentials in it, shows no secret)
AUTH_VALUE = re.compile(r"(?i)\b(basic|bearer|digest|negotiate|token)(\s+)[A-Za-z0-9+/=._~%:-]{4,}")
AUTH_HEADER = re.compile(r"(?i)\b(authorization\s*[:=])(\s*)(?!(?:basic|bearer|digest|negotiate|token)\b)[^\s,;\"']{4,}")
CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def redact_text(text: str, credentials: Credentials) -> str:
    """`text` without any form of the credentials (see Credentials.secrets)."""
    for secret in credentials.secrets:
        text = text.replace(secret, "***")
    return text


def server_text(text: Any, credentials: Credentials, limit: int = 200) -> str:
    """Something the server sent, made fit to print: control characters (new lines: one error, one line)
    replaced, cut to `limit` characters, redacted, and any value after `Basic`/`Bearer`/... blanked."""
    clean = CONTROL.sub(" ", str(text)).strip()
    blank = lambda m: f"{m.group(1)}{m.group(2)}***"  # noqa: E731
    clean = AUTH_HEADER.sub(blank, AUTH_VALUE.sub(blank, redact_text(clean, credentials)))
    return clean[:limit] + "..." if len(clean) > limit else clean


@dataclass
class Connection:
    """A DICOMwebClient over an authenticated Session, with `call` adding retries and clean errors."""

    url: str
    client: Any
    credentials: Credentials = field(default_factory=Credentials)
    retry: Retry = field(default_factory=Retry)
    sleep: Callable[[float], None] = time.sleep

    def call(self, what: str, function: Callable[..., Any], *args, **kwargs) -> Any:
        """`function(*args, **kwargs)` (a DICOMwebClient method), retried on a down or overloaded server.
        `what` says what was asked for ("QIDO-RS search for series"), for the error line."""
        import requests

        started = time.monotonic()
        waits = self.retry.waits()
        for attempt in range(len(waits) + 1):
            try:
                return function(*args, **kwargs)
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else None
                if status in AUTH_STATUS:
                    raise PacsError(self.redact(
                        f"{self.url}: authentication failed (HTTP {status}) on {what}; check the credentials in "
                        f"{ENV_USERNAME}/{ENV_PASSWORD} or {ENV_TOKEN} ({self.credentials.kind} sent)")) from None
                if status == 404:
                    raise NotFound(self.redact(f"{self.url}: {what}: not found (HTTP 404)")) from None
                if status not in RETRIABLE_STATUS:
                    kind = Refused if status is not None and 400 <= status < 500 else PacsError
                    raise kind(self.redact(f"{self.url}: {what} failed: {_status_text(status)}")) from None
                reason = _status_text(status)
            except (requests.ConnectionError, requests.Timeout) as error:
                reason = _connection_reason(error)
            except requests.RequestException as error:  # a bad answer (broken multipart, redirects...): no retry
                raise PacsError(self.redact(f"{self.url}: {what} failed: {type(error).__name__}")) from None
            except ValueError as error:  # dicomweb-client or pydicom could not read the answer; their messages
                # quote what the server sent (a media type, a part), so only the kind of error is shown
                raise BadAnswer(self.redact(f"{self.url}: {what} failed: the answer could not be read "
                                            f"({type(error).__name__})")) from None
            if attempt < len(waits):
                self.sleep(waits[attempt])
        elapsed = time.monotonic() - started
        raise PacsError(self.redact(f"{self.url}: {what} failed after {len(waits) + 1} attempts over {elapsed:.1f} s: "
                                    f"{reason} (retries: {ENV_RETRIES}, {ENV_BACKOFF})")) from None

    def redact(self, text: str) -> str:
        return redact_text(text, self.credentials)

    def say(self, line: str) -> None:
        """Print a line that may hold what the server sent (a series description): redacted."""
        print(server_text(line, self.credentials, limit=1000), flush=True)

    def search(self, what: str, function: Callable[..., list], **kwargs) -> list[dict]:
        """Every row of a QIDO-RS search, paged here with `offset` (dicomweb-client's own paging has no
        bound): until an empty page, at most MMAR_DICOMWEB_MAX_PAGES pages and MMAR_DICOMWEB_SEARCH_TIMEOUT
        seconds; a page equal to an earlier one (a server that ignores `offset`) is an error at once."""
        max_pages = _env_number(ENV_MAX_PAGES, int, MAX_PAGES)
        budget = _env_number(ENV_SEARCH_TIMEOUT, float, SEARCH_TIMEOUT)
        started = time.monotonic()
        rows: list[dict] = []
        seen: dict[str, int] = {}  # digest of a page -> the offset it was first returned at
        for page_number in range(1, max_pages + 1):
            elapsed = time.monotonic() - started
            if page_number > 1 and elapsed > budget:
                raise PacsError(self.redact(
                    f"{self.url}: {what}: stopped after {page_number - 1} pages ({len(rows)} results) and "
                    f"{elapsed:.1f} s, over the {budget:g} s a search may take ({ENV_SEARCH_TIMEOUT})"))
            page = self.call(what if page_number == 1 else f"{what} (page {page_number}, offset {len(rows)})",
                             function, offset=len(rows), get_remaining=False, **kwargs)
            if not page:
                return rows
            if not isinstance(page, list) or not all(isinstance(row, dict) for row in page):
                raise PacsError(self.redact(f"{self.url}: {what}: the answer is not a list of DICOM JSON objects"))
            digest = hashlib.sha256(json.dumps(page, sort_keys=True, default=str).encode()).hexdigest()
            if digest in seen:
                raise PacsError(self.redact(
                    f"{self.url}: {what}: the server returned the same page at offset {len(rows)} as at offset "
                    f"{seen[digest]} (it ignores `offset`?); stopped after {page_number} requests"))
            seen[digest] = len(rows)
            rows += page
        raise PacsError(self.redact(
            f"{self.url}: {what}: more than {max_pages} pages ({len(rows)} results so far); stopped "
            f"(raise {ENV_MAX_PAGES} if the archive really holds that many)"))


def _status_text(status: int | None) -> str:
    """`HTTP 500 Internal Server Error`: the standard phrase, never the reason phrase the server sent."""
    if status is None:
        return "HTTP error"
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _connection_reason(error: BaseException) -> str:
    """A short cause for a connection failure (urllib3's text is a paragraph of internals)."""
    text = str(error).lower()
    for needle, reason in (("refused", "connection refused"), ("timed out", "timed out"),
                           ("name or service not known", "host not found"), ("nodename nor servname", "host not found"),
                           ("temporary failure in name resolution", "host not found"),
                           ("certificate", "TLS certificate not accepted"), ("reset by peer", "connection reset"),
                           ("remotedisconnected", "server closed the connection")):
        if needle in text:
            return reason
    return f"connection failed ({type(error).__name__})"


class _RedactingHandler(logging.Handler):
    """dicomweb-client logs what servers send (a `Warning` header, STOW failure reasons) at WARNING and
    ERROR, which Python prints on stderr as it came: here it is printed redacted, on one line, cut short."""

    def __init__(self, credentials: Credentials):
        super().__init__(logging.WARNING)
        self.credentials = credentials

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = server_text(record.getMessage(), self.credentials)
        except Exception:  # noqa: BLE001 - a log line must never break a pull
            text = "(unprintable message)"
        print(f"warning: dicomweb-client: {text}", file=sys.stderr, flush=True)


def _route_library_logs(credentials: Credentials) -> None:
    logger = logging.getLogger("dicomweb_client")
    for handler in [h for h in logger.handlers if isinstance(h, _RedactingHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_RedactingHandler(credentials))
    logger.propagate = False


@contextlib.contextmanager
def errors_redacted(credentials: Credentials | None = None) -> Iterator[None]:
    """The last net around a command: an exception with any form of a credential in it, or in an exception
    it was raised from (a traceback shows those too), becomes one redacted PacsError line."""
    try:
        yield
    except Exception as error:
        if credentials is None:
            try:
                credentials = credentials_from_env()
            except PacsError:
                credentials = Credentials(*(os.environ.get(k) or None for k in (ENV_USERNAME, ENV_PASSWORD, ENV_TOKEN)))
        chain, seen, current = [], set(), error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            chain.append(current)
            current = current.__cause__ or current.__context__
        if any(redact_text(str(e), credentials) != str(e) or redact_text(repr(e), credentials) != repr(e) for e in chain):
            raise PacsError(redact_text(str(error), credentials)) from None
        raise


class BearerAuth:
    """requests auth: `Authorization: Bearer TOKEN` (its repr never shows the token)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


def _quiet_pydicom() -> None:
    """pydicom warns about an invalid value (a UID that is not one) quoting it, on stderr: what a server sent,
    unfiltered. mmar checks the UIDs it uses itself (mmar.pacs.query.check_file_uids) and says which."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def connect(url: str, *, timeout: float | None = None) -> Connection:
    """A connection to the DICOMweb service at `url`, authenticated from the environment."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    shown = clean_url(url)
    credentials = credentials_from_env()
    session = requests.Session()
    # as session.auth (not a default header), so that a ~/.netrc cannot replace it; the proxy and CA bundle
    # settings of the environment (REQUESTS_CA_BUNDLE, HTTPS_PROXY) still apply
    if credentials.token:
        session.auth = BearerAuth(credentials.token)
    elif credentials.username:
        session.auth = (credentials.username, credentials.password)
    timeout = timeout if timeout is not None else _env_number(ENV_TIMEOUT, float, 60.0)
    client = DICOMwebClient(shown, session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)  # retried here, where the budget and the error line are ours
    _route_library_logs(credentials)
    _quiet_pydicom()
    return Connection(shown, client, credentials, Retry.from_env())
