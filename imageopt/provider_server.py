"""The provider that ships with imageopt: Replicate's HTTP protocol over the optimizer.

``imageopt serve-provider`` runs it. It serves one model, ``imageopt/optimize``,
whose predictions fetch an image, optimize it with
:func:`imageopt.optimizer.optimize` and serve the result for a while. The same
client code talks to it and to Replicate; tests and benchmarks also ask it to
behave like a loaded provider (latency, throttling, faults).

Endpoints, as Replicate's::

    POST /v1/models/imageopt/optimize/predictions  create (201); other models 404
    POST /v1/predictions                 create; body ``version`` is MODEL_VERSION
                                         or "imageopt/optimize"
    GET  /v1/predictions/{id}            read
    POST /v1/predictions/{id}/cancel     cancel; a finished one comes back as is
    GET  /v1/predictions?cursor=...      100 a page, newest first, ``next`` URL
    GET  /outputs/{id}/{file}            the output file; 410 once expired
    GET  /_stats                         counters, for tests and benchmarks

Create takes ``{"input": {...}}`` plus the optional ``webhook`` and
``webhook_events_filter`` (kept in the record, never called) and the headers
``Cancel-After: 90s`` (``500ms``, ``1m30s``, a bare number is seconds) and
``Prefer: wait=N``. The input is ``image`` (an http(s) URL or a ``data:`` URI)
plus the fields of :class:`~imageopt.optimizer.OptimizeOptions` (``format``,
``quality``, ``max_width``, ``max_height``); anything else, or a bad value,
is answered 422 at create, as Replicate validates inputs then.

A prediction goes ``starting`` → ``processing`` → ``succeeded``, ``failed``,
``canceled`` or ``aborted``. A failed one says why in ``error``: the
optimizer's message (an empty, broken or too large image), or why the image
could not be fetched. A succeeded one has::

    "output": {
        "image": "http://HOST:PORT/outputs/ID/output.webp",
        "format": "webp", "content_type": "image/webp",
        "width": 256, "height": 171,
        "bytes_in": 112525, "bytes_out": 9304,
        "kept_input": false,   # true: the input itself, in its own format
        "encode_ms": 41.7
    },
    "metrics": {"predict_time": 0.052, "total_time": 0.061, "encode_ms": 41.7}

A loaded provider is imitated with :class:`ProviderConfig`: each prediction
spends ``starting_time`` starting and ``latency`` processing (the image work
counts toward it), both drawn per prediction (see :class:`Latency`); token
buckets answer 429 past ``create_limit`` and ``read_limit`` a minute. Faults,
drawn from one generator seeded by ``seed``: ``error_rate`` answers API
requests 503 before anything happens; ``lost_create_rate`` makes the
prediction and then answers 500 or cuts the answer off
(``lost_create_answer``), which is what ``reconcile`` exists for;
``fail_rate``, ``aborted_rate`` and ``stuck_rate`` settle a prediction's fate
at create, and a stuck one stays ``starting`` until it is canceled or its
Cancel-After deadline passes. ``throttle_rate`` answers that share of API
requests 429 during the first ``throttle_window`` seconds after the first
one, as a provider does while it sheds a surge; ``expired_output_rate`` makes
that share of succeeded predictions lose their output file at once, so the
copy finds it expired (410). ``create_delay`` holds each create's answer back
after the prediction is made, and ``output_delay`` each output file's, which
widens the moments a crash can fall into: a prediction that exists and whose
id the client does not know yet, an output being copied.

Every error answer is JSON ``{"detail": "..."}``; a 429 adds ``retry_after``
(whole seconds) and, unless told otherwise, a ``Retry-After`` header. With a
token set, the ``/v1`` endpoints want ``Authorization: Bearer <token>``;
output files do not, like Replicate's signed delivery URLs, and their ids are
unguessable. ``/_stats`` is open too: it holds counters only.

Guards on the image fetch: the host's every resolved address must be public
(loopback, private, link-local, multicast, reserved and unspecified addresses
are refused unless ``allow_private_urls``), the connection goes to the address
that was checked, each redirect hop is checked again, the body is streamed and
cut off past ``max_bytes``, and the whole fetch has ``download_timeout``
seconds.

Limits worth knowing: everything lives in memory, so a restart forgets every
prediction. At most ``max_predictions`` records are kept (the oldest tenth are
dropped together when that is passed) and output files take at most
``max_output_bytes`` (the oldest go first, answering 410 as if expired).
Inputs are kept as sent, so large ``data:`` URIs make records large: use URLs
for big jobs. Identical inputs (same image bytes and options) reuse the
encoded result of an earlier prediction, up to ``result_cache`` of them,
because benchmarks send the same sample images thousands of times.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import random
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import httpx
import uvicorn
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from imageopt.durations import parse_duration
from imageopt.errors import ConfigurationError, ImageError
from imageopt.optimizer import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    OptimizeOptions,
    OptimizeResult,
    optimize,
)
from imageopt.provider import PredictionStatus

logger = logging.getLogger(__name__)

MODEL = "imageopt/optimize"
MODEL_VERSION = hashlib.sha256(b"imageopt/optimize 1").hexdigest()
PAGE_SIZE = 100
MAX_REDIRECTS = 3
MAX_PREFER_WAIT = 60.0
LISTENING_LINE = "imageopt provider listening on {url}"

_EXTENSIONS = {"webp": "webp", "avif": "avif", "jpeg": "jpg", "png": "png"}
_UNAUTHENTICATED = "You did not pass a valid authentication token"


class Latency(BaseModel):
    """A number of seconds drawn afresh for each prediction.

    Written ``3`` (always 3 s), ``uniform:1:5`` (evenly between 1 and 5 s) or
    ``lognormal:3:0.5`` (median 3 s; 0.5 is the sigma of the underlying
    normal, so about two thirds of draws fall between 1.8 and 4.9 s).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    a: float = Field(0.0, ge=0)
    b: float = Field(0.0, ge=0)

    @classmethod
    def parse(cls, text: str | float) -> Latency:
        """Read the ``--latency`` syntax; ValueError says what is wrong."""
        if isinstance(text, int | float):
            return cls(a=float(text))

        kind, *numbers = str(text).strip().split(":")
        try:
            values = [float(n) for n in numbers]
            if not numbers:
                return cls(a=float(kind))
            if kind == "uniform" and len(values) == 2 and values[0] <= values[1]:
                return cls(kind="uniform", a=values[0], b=values[1])
            if kind == "lognormal" and len(values) == 2:
                return cls(kind="lognormal", a=values[0], b=values[1])
        except (ValueError, ValidationError):
            pass
        msg = (
            f"{text!r} is not a latency: write seconds (3), uniform:LOW:HIGH "
            "or lognormal:MEDIAN:SIGMA, every number at least 0"
        )
        raise ValueError(msg)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str | int | float):
            return cls.parse(value).model_dump()

        return value

    def draw(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.a == 0:
            return 0.0

        return rng.lognormvariate(math.log(self.a), self.b)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"

        return f"{self.kind}:{self.a:g}:{self.b:g}"


class ProviderConfig(BaseModel):
    """Every option of the provider; ``imageopt serve-provider --help`` explains
    each one under the same name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token: SecretStr | None = None
    latency: Latency = Latency()
    starting_time: Latency = Latency()
    create_limit: int = Field(600, ge=0)
    read_limit: int = Field(3000, ge=0)
    burst_seconds: float = Field(10.0, gt=0)
    retry_after_in: Literal["body", "header", "both"] = "both"
    error_rate: float = Field(0.0, ge=0, le=1)
    lost_create_rate: float = Field(0.0, ge=0, le=1)
    lost_create_answer: Literal["500", "drop"] = "500"
    fail_rate: float = Field(0.0, ge=0, le=1)
    aborted_rate: float = Field(0.0, ge=0, le=1)
    stuck_rate: float = Field(0.0, ge=0, le=1)
    throttle_rate: float = Field(0.0, ge=0, le=1)
    throttle_window: float = Field(30.0, gt=0)
    expired_output_rate: float = Field(0.0, ge=0, le=1)
    create_delay: Latency = Latency()
    output_delay: Latency = Latency()
    output_ttl: float = Field(3600.0, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    max_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0)
    download_timeout: float = Field(30.0, gt=0)
    allow_private_urls: bool = False
    seed: int | None = None
    max_predictions: int = Field(200_000, ge=10)
    max_output_bytes: int = Field(512 * 1024 * 1024, gt=0)
    result_cache: int = Field(64, ge=0)
    workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=1)
    access_log: bool = False

    @model_validator(mode="after")
    def _outcomes_fit(self) -> ProviderConfig:
        share = self.fail_rate + self.aborted_rate + self.stuck_rate
        if share > 1:
            msg = (
                f"fail, aborted and stuck rates add up to {share:g}; a prediction "
                "has one outcome, so they must add up to at most 1"
            )
            raise ValueError(msg)

        return self


def create_app(config: ProviderConfig) -> Starlette:
    """The provider as an ASGI application; its lifespan must run."""
    provider = _Provider(config)
    routes = [
        Route(
            "/v1/models/{owner}/{name}/predictions",
            provider.create_on_model,
            methods=["POST"],
        ),
        Route("/v1/predictions", provider.create_on_version, methods=["POST"]),
        Route("/v1/predictions", provider.list_predictions, methods=["GET"]),
        Route("/v1/predictions/{id}", provider.get_prediction, methods=["GET"]),
        Route("/v1/predictions/{id}/cancel", provider.cancel, methods=["POST"]),
        Route("/outputs/{id}/{file}", provider.get_output, methods=["GET"]),
        Route("/_stats", provider.stats, methods=["GET"]),
    ]
    # Room for a data: URI of the largest image accepted (base64 adds a third).
    max_body = config.max_bytes * 4 // 3 + 64 * 1024
    app = Starlette(
        routes=routes,
        lifespan=provider.lifespan,
        exception_handlers={HTTPException: _http_error},
        max_body_size=max_body,
    )
    app.state.provider = provider

    return app


def serve(config: ProviderConfig, host: str = "127.0.0.1", port: int = 8787) -> None:
    """Run the provider until interrupted.

    Once it accepts requests, one line goes to stdout,
    ``imageopt provider listening on http://HOST:PORT``, with the real port
    when ``port`` is 0, so that a parent process can read where it is.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that
    # say so, and without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        msg = f"cannot listen on {host} port {port}: {exc.strerror or exc}"
        raise ConfigurationError(msg) from exc
    sock.listen(2048)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    if config.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)

    server_config = uvicorn.Config(
        create_app(config),
        log_config=None,
        access_log=config.access_log,
        lifespan="on",
        backlog=2048,
        # Longer than the client's keep-alive, so the client is the one that
        # closes idle connections and never sends on one being closed.
        timeout_keep_alive=30,
        timeout_graceful_shutdown=3,
    )
    server = _AnnouncingServer(server_config, f"http://{shown}:{bound_port}")
    server.run(sockets=[sock])


class _AnnouncingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(LISTENING_LINE.format(url=self.url), flush=True)


# The prediction store


@dataclass(slots=True, eq=False)
class _Record:
    id: str
    seq: int
    version: str
    input: dict[str, Any]
    options: OptimizeOptions
    base_url: str
    created_at: datetime
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    status: PredictionStatus = PredictionStatus.STARTING
    started_at: datetime | None = None
    completed_at: datetime | None = None
    output: dict[str, Any] | None = None
    error: str | None = None
    logs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    deadline: asyncio.TimerHandle | None = None
    done: asyncio.Event | None = None

    def to_json(self) -> dict[str, Any]:
        url = f"{self.base_url}v1/predictions/{self.id}"
        return {
            "id": self.id,
            "model": MODEL,
            "version": self.version,
            "input": self.input,
            "output": self.output,
            "error": self.error,
            "logs": "\n".join(self.logs),
            "status": self.status.value,
            "source": "api",
            "data_removed": False,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "completed_at": _iso(self.completed_at),
            "urls": {"get": url, "cancel": f"{url}/cancel"},
            "metrics": self.metrics,
        }


@dataclass(slots=True)
class _Output:
    filename: str
    data: bytes
    content_type: str
    expires_at: float


class _OutputStore:
    """Output files by prediction id, each kept ``ttl`` seconds, ``max_bytes``
    in all.

    Identical results share one ``bytes`` object (the result cache hands out
    the same one), so memory is counted once per distinct object.
    """

    def __init__(self, ttl: float, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.total_bytes = 0
        # Insertion order is expiry order: every file gets the same ttl.
        self._files: OrderedDict[str, _Output] = OrderedDict()
        self._refs: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._files)

    def put(self, prediction_id: str, filename: str, data: bytes, kind: str) -> None:
        now = time.monotonic()
        self._files[prediction_id] = _Output(filename, data, kind, now + self.ttl)
        refs = self._refs.get(id(data), 0)
        if refs == 0:
            self.total_bytes += len(data)
        self._refs[id(data)] = refs + 1
        self.sweep(now)

    def get(self, prediction_id: str) -> _Output | None:
        self.sweep(time.monotonic())

        return self._files.get(prediction_id)

    def drop(self, prediction_id: str) -> None:
        output = self._files.pop(prediction_id, None)
        if output is not None:
            self._release(output.data)

    def sweep(self, now: float) -> None:
        """Forget expired files, then the oldest while over the byte budget."""
        while self._files:
            prediction_id, oldest = next(iter(self._files.items()))
            if oldest.expires_at > now and self.total_bytes <= self.max_bytes:
                return
            del self._files[prediction_id]
            self._release(oldest.data)

    def _release(self, data: bytes) -> None:
        refs = self._refs[id(data)] - 1
        if refs:
            self._refs[id(data)] = refs
        else:
            del self._refs[id(data)]
            self.total_bytes -= len(data)


class _ResultCache:
    """The last ``size`` results by (image digest, options); used from threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._results: OrderedDict[tuple[bytes, OptimizeOptions], OptimizeResult] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, OptimizeOptions]) -> OptimizeResult | None:
        with self._lock:
            result = self._results.get(key)
            if result is not None:
                self._results.move_to_end(key)
            return result

    def put(self, key: tuple[bytes, OptimizeOptions], result: OptimizeResult) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._results[key] = result
            while len(self._results) > self.size:
                self._results.popitem(last=False)


class _TokenBucket:
    """``per_minute`` requests a minute, with a burst of ``burst_seconds`` of
    them; 0 means no limit. Used from the event loop only, so no lock."""

    def __init__(self, per_minute: int, burst_seconds: float) -> None:
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        if self.rate == 0:
            return 0.0

        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0

        return (1 - self.tokens) / self.rate


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Unusable(Exception):
    """The input image could not be fetched; the message says why."""


# Set while a lost create drops its connection, so the one line uvicorn logs
# about the unfinished answer is known to be on purpose.
_dropping_answer: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "_dropping_answer", default=False
)


class _QuietDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _dropping_answer.get()


class _DroppedAnswer(Response):
    """A create answer that starts and never finishes: the client sees the
    connection close in the middle of the body, as after a network reset."""

    def __init__(self) -> None:
        super().__init__(status_code=201)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _dropping_answer.set(True)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"4096"),
        ]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        body = b'{"id": "'
        await send({"type": "http.response.body", "body": body, "more_body": True})


class _Provider:
    """The state and the endpoints of one provider."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.records: dict[str, _Record] = {}
        # Creation order; sequence numbers in it are contiguous because only
        # the oldest are ever dropped, so a cursor maps to an index.
        self.order: list[_Record] = []
        self.next_seq = 1
        self.outputs = _OutputStore(config.output_ttl, config.max_output_bytes)
        self.cache = _ResultCache(config.result_cache)
        self.create_bucket = _TokenBucket(config.create_limit, config.burst_seconds)
        self.read_bucket = _TokenBucket(config.read_limit, config.burst_seconds)
        self.counters = dict.fromkeys(
            (
                "requests",
                "create_requests",
                "creates",
                "reads",
                "cancels",
                "downloads",
                "throttled",
                "unauthorized",
                "invalid",
            ),
            0,
        )
        self.faults = dict.fromkeys(
            (
                "errors_5xx",
                "throttled_injected",
                "lost_creates",
                "failed",
                "aborted",
                "stuck",
                "expired_outputs",
            ),
            0,
        )
        # When the first API request came: the throttle window starts then.
        self.first_request_at: float | None = None
        self.statuses = dict.fromkeys((s.value for s in PredictionStatus), 0)
        self.started = time.monotonic()
        token = config.token.get_secret_value() if config.token else None
        self.expected_auth = f"Bearer {token}".encode() if token else None
        self.http: httpx.AsyncClient | None = None
        self.executor: ThreadPoolExecutor | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # trust_env off: a proxy from the environment would fetch on our
        # behalf and defeat the address checks.
        self.http = httpx.AsyncClient(
            timeout=self.config.download_timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": "imageopt-provider"},
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.workers, thread_name_prefix="imageopt-optimize"
        )
        quiet = _QuietDrops()
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addFilter(quiet)
        try:
            yield
        finally:
            uvicorn_log.removeFilter(quiet)
            for record in self.order:
                if record.task is not None:
                    record.task.cancel()
                if record.deadline is not None:
                    record.deadline.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)
            await self.http.aclose()

    # Endpoints

    async def create_on_model(self, request: Request) -> Response:
        self.counters["create_requests"] += 1
        refused = self._admit(request, creating=True)
        if refused is not None:
            return refused

        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if model != MODEL:
            return _error(404, f"Model {model} not found; this provider has {MODEL}")

        return await self._create(request, version_required=False)

    async def create_on_version(self, request: Request) -> Response:
        self.counters["create_requests"] += 1
        refused = self._admit(request, creating=True)
        if refused is not None:
            return refused

        return await self._create(request, version_required=True)

    async def get_prediction(self, request: Request) -> Response:
        refused = self._admit(request, creating=False)
        if refused is not None:
            return refused

        self.counters["reads"] += 1
        record = self.records.get(request.path_params["id"])
        if record is None:
            return _error(404, "Not found.")

        return JSONResponse(record.to_json())

    async def cancel(self, request: Request) -> Response:
        refused = self._admit(request, creating=False)
        if refused is not None:
            return refused

        self.counters["cancels"] += 1
        record = self.records.get(request.path_params["id"])
        if record is None:
            return _error(404, "Not found.")
        self._cancel(record, "canceled by request")

        return JSONResponse(record.to_json())

    async def list_predictions(self, request: Request) -> Response:
        refused = self._admit(request, creating=False)
        if refused is not None:
            return refused

        self.counters["reads"] += 1
        end = len(self.order)
        cursor = request.query_params.get("cursor")
        if cursor is not None:
            if not (cursor.isascii() and cursor.isdigit()):
                return _error(400, f"cursor {cursor!r} is not one this provider gave")
            first_seq = self.order[0].seq if self.order else self.next_seq
            end = max(0, min(end, int(cursor) - first_seq))
        start = max(0, end - PAGE_SIZE)
        page = self.order[start:end]
        page.reverse()

        next_url = None
        if start > 0:
            next_url = f"{request.base_url}v1/predictions?cursor={page[-1].seq}"
        body = {
            "next": next_url,
            "previous": None,
            "results": [record.to_json() for record in page],
        }
        return JSONResponse(body)

    async def get_output(self, request: Request) -> Response:
        self.counters["downloads"] += 1
        prediction_id = request.path_params["id"]
        output = self.outputs.get(prediction_id)
        if output is not None and output.filename == request.path_params["file"]:
            delay = self.config.output_delay.draw(self.rng)
            if delay > 0:
                await asyncio.sleep(delay)
            return Response(output.data, media_type=output.content_type)

        record = self.records.get(prediction_id)
        if output is None and record is not None and record.output is not None:
            ttl = self.config.output_ttl
            return _error(
                410,
                f"The output of prediction {prediction_id} has expired: outputs are "
                f"kept {ttl:g} s after the prediction completes, less when the "
                "provider runs short of memory for them",
            )
        return _error(404, "Not found.")

    async def stats(self, request: Request) -> Response:
        body = {
            **self.counters,
            "faults": self.faults,
            "predictions": {"total": len(self.order), **self.statuses},
            "outputs": {"files": len(self.outputs), "bytes": self.outputs.total_bytes},
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
        return JSONResponse(body)

    # Admission: auth, throttling and injected 5xx, before any side effect

    def _admit(self, request: Request, *, creating: bool) -> Response | None:
        self.counters["requests"] += 1
        if self.expected_auth is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected_auth):
                self.counters["unauthorized"] += 1
                return _error(401, _UNAUTHENTICATED)

        bucket = self.create_bucket if creating else self.read_bucket
        wait = bucket.take()
        if wait > 0:
            self.counters["throttled"] += 1
            return self._throttled(wait)
        if self._surge_throttles():
            self.counters["throttled"] += 1
            self.faults["throttled_injected"] += 1
            return self._throttled(1.0)

        if self.config.error_rate and self.rng.random() < self.config.error_rate:
            self.faults["errors_5xx"] += 1
            return _error(
                503, "The service is temporarily unavailable (injected by error-rate)."
            )

        return None

    def _surge_throttles(self) -> bool:
        """Whether ``throttle_rate`` answers this request 429."""
        if not self.config.throttle_rate:
            return False
        now = time.monotonic()
        if self.first_request_at is None:
            self.first_request_at = now
        if now - self.first_request_at > self.config.throttle_window:
            return False

        return self.rng.random() < self.config.throttle_rate

    def _throttled(self, wait: float) -> Response:
        seconds = max(1, math.ceil(wait))
        unit = "second" if seconds == 1 else "seconds"
        body: dict[str, Any] = {
            "detail": f"Request was throttled. Expected available in {seconds} {unit}."
        }
        where = self.config.retry_after_in
        if where in ("body", "both"):
            body["retry_after"] = seconds
        headers = {"Retry-After": str(seconds)} if where in ("header", "both") else None

        return JSONResponse(body, status_code=429, headers=headers)

    # Create

    async def _create(self, request: Request, *, version_required: bool) -> Response:
        try:
            body = await request.json()
        except ValueError:
            self.counters["invalid"] += 1
            return _error(400, "The request body is not JSON.")
        problem, options, version = self._check_create(body, version_required)
        cancel_after = None
        if problem is None:
            problem, cancel_after = _parse_cancel_after(request.headers)
        if problem is not None:
            self.counters["invalid"] += 1
            return _error(422, problem)

        assert options is not None
        record = self._new_record(request, body, options, version, cancel_after)
        if self.config.lost_create_rate and (
            self.rng.random() < self.config.lost_create_rate
        ):
            self.faults["lost_creates"] += 1
            if self.config.lost_create_answer == "drop":
                return _DroppedAnswer()
            return _error(500, "Internal server error (injected by lost-create-rate).")

        delay = self.config.create_delay.draw(self.rng)
        if delay > 0:
            await asyncio.sleep(delay)

        wait = _prefer_wait(request.headers.get("prefer"))
        if wait and not record.status.is_terminal:
            if record.done is None:
                record.done = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(record.done.wait(), wait)

        return JSONResponse(record.to_json(), status_code=201)

    def _check_create(
        self, body: Any, version_required: bool
    ) -> tuple[str | None, OptimizeOptions | None, str]:
        """What is wrong with a create body, or its options and version."""
        if not isinstance(body, dict):
            return "The request body must be a JSON object.", None, MODEL_VERSION

        version = body.get("version")
        if version_required or version is not None:
            known = (MODEL_VERSION, MODEL, f"{MODEL}:{MODEL_VERSION}")
            if version not in known:
                problem = (
                    f"Invalid version or not permitted: {version!r}; this provider "
                    f"has {MODEL} version {MODEL_VERSION}"
                )
                return problem, None, MODEL_VERSION

        input = body.get("input")
        if not isinstance(input, dict):
            return "input: a JSON object is required.", None, MODEL_VERSION
        for name in ("webhook", "webhook_events_filter"):
            if name in body and not isinstance(body[name], str | list | None):
                return f"{name}: wrong type.", None, MODEL_VERSION

        image = input.get("image")
        if not isinstance(image, str) or not _is_image_reference(image):
            problem = "input.image: an http(s) URL or a data: URI is required."
            return problem, None, MODEL_VERSION
        try:
            options = OptimizeOptions.model_validate(
                {k: v for k, v in input.items() if k != "image"}
            )
        except ValidationError as exc:
            problem = "; ".join(
                f"input.{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                for error in exc.errors()
            )
            return problem, None, MODEL_VERSION

        return None, options, MODEL_VERSION

    def _new_record(
        self,
        request: Request,
        body: dict[str, Any],
        options: OptimizeOptions,
        version: str,
        cancel_after: float | None,
    ) -> _Record:
        record = _Record(
            id=_new_id(),
            seq=self.next_seq,
            version=version,
            input=body["input"],
            options=options,
            base_url=str(request.base_url),
            created_at=datetime.now(UTC),
            webhook=body.get("webhook"),
            webhook_events_filter=body.get("webhook_events_filter"),
        )
        self.next_seq += 1
        self.records[record.id] = record
        self.order.append(record)
        self.statuses[record.status] += 1
        self.counters["creates"] += 1
        self._maybe_evict()

        loop = asyncio.get_running_loop()
        if cancel_after is not None:
            record.deadline = loop.call_later(
                cancel_after, self._deadline_passed, record, cancel_after
            )
        outcome = self._draw_outcome()
        if outcome == "stuck":
            # Nothing runs: only a cancel or the deadline moves it on.
            self.faults["stuck"] += 1
        else:
            record.task = loop.create_task(self._run(record, outcome))

        return record

    def _draw_outcome(self) -> str:
        config = self.config
        if not (config.fail_rate or config.aborted_rate or config.stuck_rate):
            return "run"

        draw = self.rng.random()
        for outcome, share in (
            ("failed", config.fail_rate),
            ("aborted", config.aborted_rate),
            ("stuck", config.stuck_rate),
        ):
            if draw < share:
                return outcome
            draw -= share

        return "run"

    def _maybe_evict(self) -> None:
        excess = len(self.order) - self.config.max_predictions
        if excess <= 0:
            return

        # Drop a tenth at once, so the list shifts rarely.
        count = max(excess, self.config.max_predictions // 10)
        for record in self.order[:count]:
            if record.task is not None:
                record.task.cancel()
            if record.deadline is not None:
                record.deadline.cancel()
            del self.records[record.id]
            self.outputs.drop(record.id)
            self.statuses[record.status] -= 1
        del self.order[:count]
        logger.info("forgot the %s oldest predictions", count)

    # Running a prediction

    async def _run(self, record: _Record, outcome: str) -> None:
        try:
            await self._run_phases(record, outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("prediction %s: the provider failed", record.id)
            self._finish(
                record,
                PredictionStatus.FAILED,
                error=f"the provider failed while running it ({type(exc).__name__})",
            )

    async def _run_phases(self, record: _Record, outcome: str) -> None:
        starting = self.config.starting_time.draw(self.rng)
        if starting > 0:
            await asyncio.sleep(starting)
        if outcome == "aborted":
            self.faults["aborted"] += 1
            error = "the provider aborted the prediction before it ran (aborted-rate)"
            self._finish(record, PredictionStatus.ABORTED, error=error)
            return

        self._set_status(record, PredictionStatus.PROCESSING)
        record.started_at = datetime.now(UTC)
        began = time.monotonic()
        latency = self.config.latency.draw(self.rng)
        if outcome == "failed":
            self.faults["failed"] += 1
            result, error = None, "the model failed (injected by fail-rate)"
        else:
            result, error = await self._predict(record)

        remaining = latency - (time.monotonic() - began)
        if remaining > 0:
            await asyncio.sleep(remaining)
        predict_time = time.monotonic() - began
        if result is None:
            self._finish(record, PredictionStatus.FAILED, error, predict_time)
        else:
            self._succeed(record, result, predict_time)

    async def _predict(self, record: _Record) -> tuple[OptimizeResult | None, str]:
        image = record.input["image"]
        try:
            if image.startswith("data:"):
                data = self._decode_data_uri(image)
                record.logs.append(f"read {len(data)} bytes from a data URI")
            else:
                data = await self._fetch(image)
                record.logs.append(
                    f"fetched {len(data)} bytes from {httpx.URL(image).host}"
                )
            loop = asyncio.get_running_loop()
            result, cached = await loop.run_in_executor(
                self.executor, self._optimize, data, record.options
            )
        except (_Unusable, ImageError) as exc:
            record.logs.append(f"failed: {exc}")
            return None, str(exc)

        record.logs.append(
            f"{'reused' if cached else 'made'} {result.format} "
            f"{result.width}x{result.height}, {result.bytes_out} bytes"
        )
        return result, ""

    def _optimize(
        self, data: bytes, options: OptimizeOptions
    ) -> tuple[OptimizeResult, bool]:
        """Runs in a worker thread: Pillow holds the CPU, not the event loop."""
        key = (hashlib.sha256(data).digest(), options)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True

        result = optimize(
            data,
            options,
            max_pixels=self.config.max_pixels,
            max_bytes=self.config.max_bytes,
        )
        self.cache.put(key, result)
        return result, False

    def _succeed(
        self, record: _Record, result: OptimizeResult, predict_time: float
    ) -> None:
        if record.status.is_terminal:
            return

        filename = f"output.{_EXTENSIONS.get(result.format, result.format)}"
        rate = self.config.expired_output_rate
        if rate and self.rng.random() < rate:
            # The record says where the output was; the file is already gone.
            self.faults["expired_outputs"] += 1
        else:
            self.outputs.put(record.id, filename, result.data, result.content_type)
        record.output = {
            "image": f"{record.base_url}outputs/{record.id}/{filename}",
            "format": result.format,
            "content_type": result.content_type,
            "width": result.width,
            "height": result.height,
            "bytes_in": result.bytes_in,
            "bytes_out": result.bytes_out,
            "kept_input": result.kept_input,
            "encode_ms": result.encode_ms,
        }
        self._finish(
            record,
            PredictionStatus.SUCCEEDED,
            predict_time=predict_time,
            metrics={"encode_ms": round(result.encode_ms, 3)},
        )

    def _finish(
        self,
        record: _Record,
        status: PredictionStatus,
        error: str | None = None,
        predict_time: float | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        if record.status.is_terminal:
            return

        self._set_status(record, status)
        record.completed_at = datetime.now(UTC)
        record.error = error
        total = (record.completed_at - record.created_at).total_seconds()
        record.metrics = {
            **(metrics or {}),
            "total_time": round(total, 4),
        }
        if predict_time is not None:
            record.metrics["predict_time"] = round(predict_time, 4)
        if record.deadline is not None:
            record.deadline.cancel()
            record.deadline = None
        record.task = None
        if record.done is not None:
            record.done.set()

    def _set_status(self, record: _Record, status: PredictionStatus) -> None:
        self.statuses[record.status] -= 1
        self.statuses[status] += 1
        record.status = status

    def _cancel(self, record: _Record, reason: str) -> None:
        if record.status.is_terminal:
            return

        if record.task is not None:
            record.task.cancel()
        record.logs.append(reason)
        self._finish(record, PredictionStatus.CANCELED)

    def _deadline_passed(self, record: _Record, seconds: float) -> None:
        record.deadline = None
        self._cancel(record, f"canceled: the Cancel-After deadline of {seconds:g} s")

    # Fetching the image

    def _decode_data_uri(self, uri: str) -> bytes:
        limit = self.config.max_bytes
        header, _, payload = uri[len("data:") :].partition(",")
        if header.endswith(";base64"):
            if len(payload) * 3 // 4 > limit:
                msg = f"the data URI holds more than the limit of {limit} bytes"
                raise _Unusable(msg)
            try:
                data = base64.b64decode(payload, validate=True)
            except binascii.Error as exc:
                raise _Unusable(f"the data URI is not valid base64: {exc}") from exc
        else:
            data = unquote_to_bytes(payload)
        if len(data) > limit:
            raise _Unusable(f"the data URI holds more than the limit of {limit} bytes")

        return data

    async def _fetch(self, url: str) -> bytes:
        timeout = self.config.download_timeout
        host = httpx.URL(url).host
        try:
            async with asyncio.timeout(timeout):
                return await self._follow(httpx.URL(url))
        except TimeoutError:
            msg = f"fetching the image from {host} took longer than {timeout:g} s"
            raise _Unusable(msg) from None
        except httpx.HTTPError as exc:
            msg = f"fetching the image from {host} failed: {type(exc).__name__}"
            raise _Unusable(msg) from exc

    async def _follow(self, url: httpx.URL) -> bytes:
        """GET ``url``, checking the address of every hop."""
        assert self.http is not None
        for _ in range(MAX_REDIRECTS + 1):
            request = await self._checked_request(url)
            response = await self.http.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.is_redirect and location:
                    url = url.join(location)
                    continue
                if not response.is_success:
                    msg = (
                        f"fetching the image from {url.host} answered HTTP "
                        f"{response.status_code}"
                    )
                    raise _Unusable(msg)
                return await self._read_limited(response, url.host)
            finally:
                await response.aclose()

        msg = f"fetching the image from {url.host}: more than {MAX_REDIRECTS} redirects"
        raise _Unusable(msg)

    async def _checked_request(self, url: httpx.URL) -> httpx.Request:
        """A request for ``url``, sent to an address that was checked."""
        assert self.http is not None
        if url.scheme not in ("http", "https") or not url.host:
            raise _Unusable(f"cannot fetch the image from a {url.scheme}: URL")
        if self.config.allow_private_urls:
            return self.http.build_request("GET", url)

        host = url.host
        addresses = await _resolve(url)
        for address in addresses:
            kind = _forbidden_kind(address)
            if kind is not None:
                msg = (
                    f"refused to fetch the image from {host}: it resolves to "
                    f"{address}, a {kind} address; this provider fetches only "
                    "from public addresses"
                )
                raise _Unusable(msg)

        # Connect to the address just checked, not to whatever a second DNS
        # answer says, while the server still sees its own name.
        pinned = url.copy_with(host=str(addresses[0]))
        sni = url.raw_host.decode("ascii")
        extensions = {"sni_hostname": sni} if url.scheme == "https" else {}
        return self.http.build_request(
            "GET",
            pinned,
            headers={"Host": url.netloc.decode("ascii")},
            extensions=extensions,
        )

    async def _read_limited(self, response: httpx.Response, host: str) -> bytes:
        limit = self.config.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            msg = f"the image at {host} is {declared} bytes, over the limit of {limit}"
            raise _Unusable(msg)

        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                msg = f"the image at {host} is over the limit of {limit} bytes"
                raise _Unusable(msg)
            chunks.append(chunk)

        return b"".join(chunks)


async def _resolve(url: httpx.URL) -> list[_Address]:
    host = url.raw_host.decode("ascii")
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass

    loop = asyncio.get_running_loop()
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _Unusable(f"cannot resolve the image host {url.host}: {exc}") from exc
    # Drop an IPv6 scope ("fe80::1%eth0"): ipaddress would refuse it.
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise _Unusable(f"the image host {url.host} has no address")

    return addresses


def _forbidden_kind(address: _Address) -> str | None:
    """Why the provider must not connect to ``address``, or None if it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    ):
        if flag:
            return kind

    return None


def _is_image_reference(image: str) -> bool:
    if image.startswith("data:"):
        return "," in image
    try:
        url = httpx.URL(image)
    except httpx.InvalidURL:
        return False

    return url.scheme in ("http", "https") and bool(url.host)


def _parse_cancel_after(headers: Any) -> tuple[str | None, float | None]:
    """The Cancel-After duration in seconds, or what is wrong with it."""
    text = headers.get("cancel-after")
    if text is None:
        return None, None

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        return f"Cancel-After: {exc}", None

    return None, seconds


def _prefer_wait(prefer: str | None) -> float | None:
    """Seconds asked for by ``Prefer: wait=N`` (``Prefer: wait`` is 60)."""
    if not prefer:
        return None
    found = re.search(r"\bwait(?:=(\d+))?", prefer)
    if found is None:
        return None

    seconds = float(found.group(1)) if found.group(1) else MAX_PREFER_WAIT
    return min(seconds, MAX_PREFER_WAIT)


def _new_id() -> str:
    """A Replicate-like id: 26 lowercase base32 characters."""
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii")[:26].lower()


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )
