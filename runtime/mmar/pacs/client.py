"""The DICOMweb connection: credentials from the environment, bounded retries, failures as one clean line.

Credentials are read from the environment only (the operator fills it from a Kubernetes Secret):
MMAR_DICOMWEB_USERNAME + MMAR_DICOMWEB_PASSWORD (HTTP basic) or MMAR_DICOMWEB_TOKEN (bearer). They ride
on the requests Session (never in a URL: a URL with user:password@ is refused, since URLs end up in
error messages), and every message this module raises passes through `redact`, so a server or library
that echoes a header back cannot put a secret into a log, an event or a step result either.

A server that is down, overloaded (5xx, 408, 429) or unreachable is retried with exponential back-off
(MMAR_DICOMWEB_RETRIES retries, default 4, the first wait MMAR_DICOMWEB_BACKOFF seconds, default 1, then
doubling: 1+2+4+8 = 15 s at most by default), then reported as one line naming the URL and what failed.
401/403 is not retried: the same credentials will not start working.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from mmar.errors import MMARError

ENV_USERNAME, ENV_PASSWORD, ENV_TOKEN = "MMAR_DICOMWEB_USERNAME", "MMAR_DICOMWEB_PASSWORD", "MMAR_DICOMWEB_TOKEN"
ENV_RETRIES, ENV_BACKOFF, ENV_TIMEOUT = "MMAR_DICOMWEB_RETRIES", "MMAR_DICOMWEB_BACKOFF", "MMAR_DICOMWEB_TIMEOUT"
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}
AUTH_STATUS = {401, 403}


class PacsError(MMARError):
    """A DICOMweb request failed; the message names the server and the request, never a credential."""


class NotFound(PacsError):
    """The server answered 404 for a study, series or instance."""


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in (self.password, self.token, self.username) if v)

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
                    raise PacsError(self.redact(f"{self.url}: {what} failed: HTTP {status} {_reason(error)}")) from None
                reason = f"HTTP {status} {_reason(error)}"
            except (requests.ConnectionError, requests.Timeout) as error:
                reason = _connection_reason(error)
            except requests.RequestException as error:  # a bad answer (broken multipart, redirects...): no retry
                raise PacsError(self.redact(f"{self.url}: {what} failed: {type(error).__name__}")) from None
            if attempt < len(waits):
                self.sleep(waits[attempt])
        elapsed = time.monotonic() - started
        raise PacsError(self.redact(f"{self.url}: {what} failed after {len(waits) + 1} attempts over {elapsed:.1f} s: "
                                    f"{reason} (retries: {ENV_RETRIES}, {ENV_BACKOFF})")) from None

    def redact(self, text: str) -> str:
        for secret in sorted(self.credentials.secrets, key=len, reverse=True):
            if len(secret) >= 3:  # a one- or two-letter user name would blank out half the message
                text = text.replace(secret, "***")
        return text


def _reason(error) -> str:
    response = error.response
    return (response.reason or "").strip() if response is not None else ""


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


class BearerAuth:
    """requests auth: `Authorization: Bearer TOKEN` (its repr never shows the token)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


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
    return Connection(shown, client, credentials, Retry.from_env())
