"""The client of a prediction API that speaks Replicate's HTTP protocol.

The same client talks to Replicate and to the provider that ships with
imageopt (``imageopt serve-provider``). It is synchronous because the pipeline
runs its tasks in threads; one :class:`ProviderClient` holds one connection
pool and may be shared by every thread of a process.

What the provider answers is translated here, once, into
:mod:`imageopt.errors`:

============================================  ================================
what happened                                 raised
============================================  ================================
429                                           ``ThrottledError(retry_after)``
401, 403, 422 and every other 4xx             ``RejectedError(status_code)``
404 for a prediction id                       ``PredictionNotFoundError``
5xx, refused connection, timeout (reads)      ``ProviderUnavailableError``
create: the request never left this machine   ``ProviderUnavailableError``
create: sent, and the answer was lost or 5xx  ``CreateOutcomeUnknownError``
============================================  ================================

Reads (``get``, ``list``, ``cancel``, ``download``) are retried on 429, 5xx and
timeouts with bounded exponential backoff and jitter; a 429 is waited out for at
least the time the provider asked. A create is never retried: Replicate has no
idempotency key, so a second create is a second, paid prediction. When a create
may have reached the provider and no usable answer came back, the caller gets
``CreateOutcomeUnknownError`` and settles the question with :meth:`reconcile`,
which looks for a prediction made with the same input.

Which create failures count as "never sent": a refused connection, a connect
timeout, or no free connection in the pool; also a 503, which means the
provider is not taking requests (RFC 9110, section 15.6.4) and is what a
Replicate-style front answers before a prediction exists. Any other 5xx (a 500
from the application, a 502 or 504 from a gateway that gave up waiting) and a
lost answer (read timeout, reset connection, truncated response) may follow a
prediction that was made, so they are unknown outcomes.

The token is a :class:`~pydantic.SecretStr`. It goes into the
``Authorization`` header of requests to the provider's own origin and nowhere
else: not into logs, reprs or exception messages, and not to output URLs on
other hosts.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from imageopt.errors import (
    ConfigurationError,
    CreateOutcomeUnknownError,
    PredictionNotFoundError,
    ProviderError,
    ProviderUnavailableError,
    RejectedError,
    ThrottledError,
)
from imageopt.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "imageopt/optimize"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024

# Used when a 429 says neither in its body nor in a header how long to wait.
DEFAULT_RETRY_AFTER = 1.0

# Replicate waits at most 60 s for ``Prefer: wait``.
MAX_PREFER_WAIT = 60

# How far the provider's clock may be ahead of ours when reconcile compares
# created_at with the time the caller says it sent the create.
RECONCILE_CLOCK_SKEW = timedelta(minutes=2)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class PredictionStatus(StrEnum):
    """Where a prediction is in its life, as the provider names it."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    # Terminal too: the official client once waited forever on it.
    ABORTED = "aborted"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        PredictionStatus.SUCCEEDED,
        PredictionStatus.FAILED,
        PredictionStatus.CANCELED,
        PredictionStatus.ABORTED,
    }
)


class Prediction(BaseModel):
    """A prediction as the provider reports it.

    Fields this code does not use (Replicate sends ``source``,
    ``data_removed`` and more) are ignored, so new ones break nothing.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    model: str | None = None
    version: str | None = None
    status: PredictionStatus
    input: dict[str, Any] = Field(default_factory=dict)
    output: Any | None = None
    error: str | None = None
    logs: str | None = None
    metrics: dict[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    urls: dict[str, str] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _no_input_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal


class PredictionPage(BaseModel):
    """One page of ``GET /v1/predictions``, newest first."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    next: str | None = None
    previous: str | None = None
    results: list[Prediction] = Field(default_factory=list)

    @property
    def next_cursor(self) -> str | None:
        return _cursor_of(self.next) if self.next else None


class RetryPolicy(BaseModel):
    """How reads are retried: ``max_attempts`` tries in all, backoff doubling
    from ``base_delay`` up to ``max_backoff`` seconds, with jitter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(5, ge=1)
    base_delay: float = Field(0.25, ge=0)
    max_backoff: float = Field(20.0, gt=0)

    def delay(self, attempt: int, error: ProviderError) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (from 1).

        The jitter keeps threads that failed together from retrying together;
        a throttled request waits at least what the provider asked, even past
        ``max_backoff``, because asking sooner only earns another 429.
        """
        ceiling = min(self.max_backoff, self.base_delay * 2 ** (attempt - 1))
        backoff = random.uniform(ceiling / 2, ceiling)
        if isinstance(error, ThrottledError):
            return max(error.retry_after, backoff)

        return backoff


class ProviderClient:
    """A thread-safe, synchronous client of a Replicate-style prediction API.

    ``base_url`` is the API's origin, such as ``https://api.replicate.com``
    (a trailing ``/v1`` is accepted). Predictions are made on ``model``
    ("owner/name", through ``/v1/models/{owner}/{name}/predictions``) or, when
    ``version`` is given, on that version through ``/v1/predictions``.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        token: SecretStr | str | None = None,
        *,
        model: str = DEFAULT_MODEL,
        version: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        max_connections: int = 100,
    ) -> None:
        msg = f"the provider URL must be an http(s) URL, not {base_url!r}"
        try:
            origin = httpx.URL(base_url.rstrip("/").removesuffix("/v1"))
        except httpx.InvalidURL as exc:
            raise ConfigurationError(msg) from exc
        if origin.scheme not in ("http", "https") or not origin.host:
            raise ConfigurationError(msg)
        owner, _, name = model.partition("/")
        if version is None and (not owner or not name or "/" in name):
            msg = f"the provider model must be 'owner/name', not {model!r}"
            raise ConfigurationError(msg)

        if isinstance(token, str):
            token = SecretStr(token)
        self._origin = origin
        self._model = model
        self._version = version
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._max_download_bytes = max_download_bytes
        self._auth_headers = (
            {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        )
        if version is None:
            self._create_path = f"/v1/models/{quote(owner)}/{quote(name)}/predictions"
        else:
            self._create_path = "/v1/predictions"
        # The provider's own keep-alive may be as short as 5 s; expiring ours
        # first avoids sending a create on a connection the server is closing,
        # which would make its outcome unknown for nothing.
        self._http = httpx.Client(
            base_url=str(origin),
            headers={"User-Agent": "imageopt"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=4.0,
            ),
            follow_redirects=False,
        )
        self._closed = threading.Event()

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, **options: Any
    ) -> ProviderClient:
        """A client for the provider the settings name (URL, token, model or version).

        They come from the ``imageopt-provider`` block ``IMAGEOPT_PROVIDER_BLOCK``
        names, else from ``IMAGEOPT_PROVIDER_URL``, ``IMAGEOPT_PROVIDER_TOKEN``
        and the rest.
        """
        settings = settings or get_settings()
        if not settings.provider_url:
            msg = (
                "no prediction API configured: set IMAGEOPT_PROVIDER_URL to its base "
                "URL (https://api.replicate.com, or the URL `imageopt serve-provider` "
                "prints) and IMAGEOPT_PROVIDER_TOKEN to its token, or "
                "IMAGEOPT_PROVIDER_BLOCK to a saved imageopt-provider block"
            )
            raise ConfigurationError(msg)
        if settings.provider_model:
            options.setdefault("model", settings.provider_model)
        if settings.provider_version:
            options.setdefault("version", settings.provider_version)

        return cls(settings.provider_url, settings.provider_token, **options)

    def __enter__(self) -> ProviderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        target = f"version={self._version!r}" if self._version else repr(self._model)
        return f"<ProviderClient {self._origin} {target}>"

    def close(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        self._closed.set()
        self._http.close()

    # Predictions

    def create(
        self,
        input: dict[str, Any],
        *,
        cancel_after: str | float | None = None,
        webhook: str | None = None,
        webhook_events_filter: Collection[str] | None = None,
        wait: int | None = None,
    ) -> Prediction:
        """Start a prediction; never retried (see the module docstring).

        ``cancel_after`` is a duration such as ``"90s"`` or ``"5m"`` (a number
        is seconds) after which the provider cancels the prediction if it has
        not finished. ``wait`` asks the provider to hold the answer up to that
        many seconds (at most 60) for the prediction to finish.
        """
        body: dict[str, Any] = {"input": input}
        if self._version is not None:
            body["version"] = self._version
        if webhook is not None:
            body["webhook"] = webhook
        if webhook_events_filter is not None:
            body["webhook_events_filter"] = list(webhook_events_filter)
        headers = dict(self._auth_headers)
        if cancel_after is not None:
            headers["Cancel-After"] = _duration(cancel_after)
        timeout = self._http.timeout
        if wait is not None:
            wait = max(1, min(int(wait), MAX_PREFER_WAIT))
            headers["Prefer"] = f"wait={wait}"
            timeout = httpx.Timeout(self._timeout + wait, connect=timeout.connect)

        what = f"create of a prediction on {self._target}"
        request = self._http.build_request(
            "POST", self._create_path, json=body, headers=headers, timeout=timeout
        )
        response = self._send(request, what, creating=True)
        if response.status_code >= 500 and response.status_code != 503:
            msg = (
                f"{what}: the provider answered HTTP {response.status_code} "
                f"({_detail(response)}); the prediction may exist: reconcile "
                "before creating it again"
            )
            raise CreateOutcomeUnknownError(msg)
        self._raise_for_status(response, what, not_found=self._model_not_found)
        try:
            prediction = Prediction.model_validate_json(response.content)
        except ValidationError as exc:
            msg = (
                f"{what}: the provider answered HTTP {response.status_code} with a "
                "body that is not a prediction; it may exist: reconcile before "
                "creating it again"
            )
            raise CreateOutcomeUnknownError(msg) from exc

        logger.info("prediction %s created (%s)", prediction.id, prediction.status)
        return prediction

    def get(self, prediction_id: str) -> Prediction:
        """The prediction's current state."""
        path = f"/v1/predictions/{quote(prediction_id, safe='')}"
        what = f"read of prediction {prediction_id}"

        return self._read_prediction("GET", path, what, prediction_id)

    def cancel(self, prediction_id: str) -> Prediction:
        """Ask the provider to cancel; a finished prediction comes back as it is.

        Retried like a read: canceling twice has the effect of canceling once.
        """
        path = f"/v1/predictions/{quote(prediction_id, safe='')}/cancel"
        what = f"cancel of prediction {prediction_id}"

        return self._read_prediction("POST", path, what, prediction_id)

    def list(self, *, cursor: str | None = None) -> PredictionPage:
        """One page of recent predictions, newest first.

        ``cursor`` is a page's ``next_cursor`` (or its ``next`` URL).
        """
        params = {"cursor": _cursor_of(cursor)} if cursor else None
        what = "list of predictions"

        def attempt() -> PredictionPage:
            request = self._http.build_request(
                "GET", "/v1/predictions", params=params, headers=self._auth_headers
            )
            response = self._send(request, what, creating=False)
            self._raise_for_status(response, what)
            return _parse(PredictionPage, response, what)

        return self._with_retries(what, attempt)

    def iter_predictions(self, *, max_pages: int | None = None) -> Iterator[Prediction]:
        """Recent predictions, newest first, following the ``next`` cursors.

        Only the cursor is taken from a ``next`` URL; the request goes to this
        client's own origin, so the token never follows a link elsewhere.
        """
        cursor: str | None = None
        pages = 0
        while max_pages is None or pages < max_pages:
            page = self.list(cursor=cursor)
            pages += 1
            yield from page.results
            cursor = page.next_cursor
            if cursor is None:
                return

    def recent_successes(self) -> list[Prediction]:
        """This model's predictions that succeeded, from the newest page of the list.

        Newest first; one request. Predictions still running are left out, so
        the durations they give lean a little short while many are running.
        """
        return [
            prediction
            for prediction in self.list().results
            if prediction.status is PredictionStatus.SUCCEEDED
            and self._is_ours(prediction)
        ]

    def reconcile(
        self,
        input: dict[str, Any],
        *,
        since: datetime | None = None,
        max_pages: int = 10,
        exclude: Collection[str] = (),
    ) -> Prediction | None:
        """The newest prediction made on this model with exactly ``input``.

        This settles a :class:`~imageopt.errors.CreateOutcomeUnknownError`:
        if the lost create made a prediction, it is found here and nothing is
        paid twice; if ``None`` comes back, creating again is safe. ``since``
        (when the create was sent) stops the search at older predictions,
        allowing :data:`RECONCILE_CLOCK_SKEW` for the provider's clock;
        ``exclude`` skips ids already claimed, for callers that send the same
        input for several items. The search reads at most ``max_pages`` pages.
        """
        wanted = json.loads(json.dumps(input))
        cutoff = None
        if since is not None:
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
            cutoff = since - RECONCILE_CLOCK_SKEW

        for prediction in self.iter_predictions(max_pages=max_pages):
            created_at = prediction.created_at
            if cutoff is not None and created_at is not None and created_at < cutoff:
                break
            if prediction.id in exclude or not self._is_ours(prediction):
                continue
            # Some providers leave the input out of list results.
            if not prediction.input:
                prediction = self.get(prediction.id)
            if prediction.input == wanted:
                logger.info("reconciled: prediction %s exists", prediction.id)
                return prediction

        logger.info("reconciled: no prediction with that input exists")
        return None

    # Outputs

    def download(self, url: str, *, max_bytes: int | None = None) -> bytes:
        """Fetch an output file, at most ``max_bytes`` of it.

        The token is sent only when ``url`` is on the provider's own origin;
        Replicate serves outputs from another host through signed URLs.
        """
        limit = max_bytes or self._max_download_bytes
        target = httpx.URL(url)
        what = f"download of {_redacted(target)}"
        if target.scheme not in ("http", "https"):
            msg = f"{what}: only http and https URLs can be downloaded"
            raise ProviderError(msg)
        headers = self._auth_headers if self._is_own_origin(target) else {}

        return self._with_retries(
            what, lambda: self._download_once(target, headers, limit, what)
        )

    def _download_once(
        self, url: httpx.URL, headers: dict[str, str], limit: int, what: str
    ) -> bytes:
        request = self._http.build_request("GET", url, headers=headers)
        response = self._send(request, what, creating=False, stream=True)
        try:
            if response.status_code in (404, 410):
                response.read()
                msg = (
                    f"{what}: the output is gone (HTTP {response.status_code}): "
                    "outputs expire about an hour after the prediction completes, "
                    "so copy them when it does"
                )
                raise RejectedError(msg, response.status_code)
            if not response.is_success:
                response.read()
                self._raise_for_status(response, what)
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > limit:
                msg = f"{what}: the output is {declared} bytes, over the limit {limit}"
                raise ProviderError(msg)

            chunks: list[bytes] = []
            size = 0
            with self._translating(what, creating=False):
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:
                        msg = f"{what}: the output is over the limit of {limit} bytes"
                        raise ProviderError(msg)
                    chunks.append(chunk)
        finally:
            response.close()

        return b"".join(chunks)

    # Plumbing

    @property
    def _target(self) -> str:
        return f"version {self._version}" if self._version else self._model

    def _is_ours(self, prediction: Prediction) -> bool:
        if self._version is not None:
            return prediction.version in (None, self._version)

        return prediction.model in (None, self._model)

    def _is_own_origin(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == (
            self._origin.scheme,
            self._origin.host,
            self._origin.port,
        )

    def _model_not_found(self, response: httpx.Response, what: str) -> ProviderError:
        msg = f"{what}: the provider has no {self._target} ({_detail(response)})"
        return RejectedError(msg, 404)

    def _read_prediction(
        self, method: str, path: str, what: str, prediction_id: str
    ) -> Prediction:
        def not_found(response: httpx.Response, what: str) -> ProviderError:
            msg = f"{what}: the provider knows no prediction {prediction_id}"
            return PredictionNotFoundError(msg)

        def attempt() -> Prediction:
            request = self._http.build_request(method, path, headers=self._auth_headers)
            response = self._send(request, what, creating=False)
            self._raise_for_status(response, what, not_found=not_found)
            return _parse(Prediction, response, what)

        return self._with_retries(what, attempt)

    def _with_retries(self, what: str, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until it succeeds, retrying throttles and outages."""
        for number in range(1, self._retry.max_attempts + 1):
            try:
                return attempt()
            except (ThrottledError, ProviderUnavailableError) as exc:
                if number == self._retry.max_attempts or self._closed.is_set():
                    raise
                delay = self._retry.delay(number, exc)
                logger.debug(
                    "%s: attempt %s of %s failed (%s); retrying in %.2f s",
                    what,
                    number,
                    self._retry.max_attempts,
                    exc,
                    delay,
                )
                time.sleep(delay)

        raise AssertionError("unreachable: the last attempt returns or raises")

    def _send(
        self, request: httpx.Request, what: str, *, creating: bool, stream: bool = False
    ) -> httpx.Response:
        with self._translating(what, creating=creating):
            response = self._http.send(request, stream=stream)

        if logger.isEnabledFor(logging.DEBUG):
            url = _redacted(request.url)
            logger.debug("%s %s -> %s", request.method, url, response.status_code)

        return response

    def _translating(self, what: str, *, creating: bool) -> _Translating:
        return _Translating(what, self._origin, creating)

    def _raise_for_status(
        self,
        response: httpx.Response,
        what: str,
        *,
        not_found: Callable[[httpx.Response, str], ProviderError] | None = None,
    ) -> None:
        code = response.status_code
        if response.is_success:
            return

        if code == 429:
            retry_after = _retry_after(response)
            msg = (
                f"{what}: throttled by the provider (HTTP 429); retry in "
                f"{retry_after:g} s"
            )
            raise ThrottledError(msg, retry_after)
        if code == 401:
            msg = (
                f"{what}: the provider refused the token (HTTP 401): check "
                "IMAGEOPT_PROVIDER_TOKEN"
            )
            raise RejectedError(msg, code)
        if code == 404 and not_found is not None:
            raise not_found(response, what)
        if code >= 500:
            msg = f"{what}: the provider answered HTTP {code} ({_detail(response)})"
            raise ProviderUnavailableError(msg)
        msg = f"{what}: the provider refused it (HTTP {code}): {_detail(response)}"
        raise RejectedError(msg, code)


# Failures that happen before any byte of the request is written.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class _Translating:
    """Turns httpx's transport errors into provider errors, once.

    A class rather than a generator-based context manager because it sits
    on every request, and the exception chain should start at httpx.
    """

    __slots__ = ("creating", "origin", "what")

    def __init__(self, what: str, origin: httpx.URL, creating: bool) -> None:
        self.what = what
        self.origin = origin
        self.creating = creating

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, httpx.HTTPError):
            return False

        what = self.what
        kind_name = type(exc).__name__
        if isinstance(exc, httpx.UnsupportedProtocol):
            msg = f"{what}: the URL's scheme is not http or https ({exc})"
            raise ConfigurationError(msg) from exc
        # Nothing was written to the network: safe to send again later.
        if isinstance(exc, _NOT_SENT):
            msg = f"{what}: could not reach the provider at {self.origin} ({kind_name})"
            raise ProviderUnavailableError(msg) from exc
        if self.creating:
            msg = (
                f"{what}: the request was sent and no answer came back ({kind_name}); "
                "the prediction may exist: reconcile before creating it again"
            )
            raise CreateOutcomeUnknownError(msg) from exc
        msg = f"{what}: no answer from the provider at {self.origin} ({kind_name})"
        raise ProviderUnavailableError(msg) from exc


def _parse(model: type[M], response: httpx.Response, what: str) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        msg = (
            f"{what}: the provider answered HTTP {response.status_code} with a body "
            f"that is not a {model.__name__} ({exc.error_count()} errors)"
        )
        raise ProviderError(msg) from exc


def _detail(response: httpx.Response) -> str:
    """The provider's own explanation: JSON ``detail``, else the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        detail = response.text.strip() or response.reason_phrase
    text = detail if isinstance(detail, str) else json.dumps(detail)

    return text[:300]


_AVAILABLE_IN = re.compile(r"available in (\d+(?:\.\d+)?) second")


def _retry_after(response: httpx.Response) -> float:
    """Seconds a 429 asks to wait: JSON ``retry_after``, else the ``Retry-After``
    header (seconds or an HTTP date), else the number in Replicate's detail
    text ("Expected available in 5 seconds."), else a default."""
    body: Any = None
    with contextlib.suppress(ValueError):
        body = response.json()
    if isinstance(body, dict):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return max(0.0, float(body["retry_after"]))

    header = response.headers.get("Retry-After")
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, (when - datetime.now(UTC)).total_seconds())

    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        found = _AVAILABLE_IN.search(body["detail"])
        if found:
            return float(found.group(1))

    return DEFAULT_RETRY_AFTER


def _duration(value: str | float) -> str:
    """A Cancel-After value: numbers are seconds, strings pass as written."""
    if isinstance(value, int | float):
        return f"{value:g}s"

    return value


def _cursor_of(value: str) -> str:
    """The cursor itself, whether given bare or inside a ``next`` URL."""
    if "://" in value or value.startswith("/"):
        cursor = httpx.URL(value).params.get("cursor")
        if cursor is None:
            msg = f"the page link {_redacted(httpx.URL(value))} carries no cursor"
            raise ProviderError(msg)
        return cursor

    return value


def _redacted(url: httpx.URL) -> str:
    """The URL without its query: signed URLs carry their secret there."""
    return str(url.copy_with(query=None, fragment=None))


class _RedactedRequestLog(logging.Filter):
    """Strips queries from the URLs in httpx's own "HTTP Request: ..." lines.

    httpx logs every request's full URL at INFO; for a signed output URL
    that is the signature. Installed once, on the ``httpx`` logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, httpx.URL) for arg in record.args
        ):
            record.args = tuple(
                _redacted(arg) if isinstance(arg, httpx.URL) else arg
                for arg in record.args
            )
        return True


def _redact_httpx_log() -> None:
    httpx_logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactedRequestLog) for f in httpx_logger.filters):
        httpx_logger.addFilter(_RedactedRequestLog())


_redact_httpx_log()
