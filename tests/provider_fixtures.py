"""Fixtures that run the real provider server and serve test images over HTTP.

``provider_server`` starts ``python -m imageopt serve-provider --port 0`` as a
subprocess, exactly as a person would, and reads the line it prints to learn
its URL. ``image_server`` is a plain HTTP server in a thread that hands out
the sample images and any bytes a test registers, so predictions can fetch
``http://127.0.0.1:...`` URLs.
"""

from __future__ import annotations

import contextlib
import http.server
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imageopt.provider import ProviderClient
from imageopt.samples import sample_paths
from imageopt.services import ProviderProcess


class ProviderServer(ProviderProcess):
    """A running ``imageopt serve-provider`` subprocess, with its log on disk."""

    def __init__(self, args: list[str], token: str | None, log_path: Path) -> None:
        self.args = args
        self.token = token
        self._clients: list[ProviderClient] = []
        super().__init__(*args, token=token, log_path=log_path)

    def client(self, **options: Any) -> ProviderClient:
        """A client of this server, with its token unless ``token=`` is given."""
        options.setdefault("token", self.token)
        client = ProviderClient(self.url, **options)
        self._clients.append(client)

        return client

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        super().stop()


def start_provider_server(
    log_dir: Path, *args: str, token: str | None = None
) -> ProviderServer:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"provider-{time.monotonic_ns()}.log"

    return ProviderServer(list(args), token, log_path)


@pytest.fixture
def provider_server(
    tmp_path: Path,
) -> Iterator[Callable[..., ProviderServer]]:
    """Start a provider with extra command-line options; stopped after the test.

    ``provider_server("--allow-private-urls", "--latency", "2", token="t")``
    """
    started: list[ProviderServer] = []

    def start(*args: str, token: str | None = None) -> ProviderServer:
        server = start_provider_server(tmp_path, *args, token=token)
        started.append(server)
        return server

    yield start

    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def shared_provider_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProviderServer]:
    """One provider for a whole test module: no latency, no faults, no limits,
    fetching from 127.0.0.1 allowed."""
    server = start_provider_server(
        tmp_path_factory.mktemp("provider"),
        "--allow-private-urls",
        "--create-limit",
        "0",
        "--read-limit",
        "0",
    )

    yield server

    server.stop()


@dataclass
class _Served:
    data: bytes
    content_type: str
    delay: float = 0.0
    declare_length: bool = True


@dataclass
class ImageServer:
    """What the test image server serves, and the requests it has seen."""

    url: str = ""
    files: dict[str, _Served] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def put(
        self,
        path: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        delay: float = 0.0,
        declare_length: bool = True,
    ) -> str:
        """Serve ``data`` at ``path``; its URL.

        The answer comes after ``delay`` seconds; without ``declare_length``
        it has no Content-Length and ends when the connection closes.
        """
        path = "/" + path.lstrip("/")
        self.files[path] = _Served(data, content_type, delay, declare_length)

        return self.url + path

    def sample_url(self, name: str) -> str:
        return f"{self.url}/samples/{name}"

    def headers_of(self, path: str) -> list[dict[str, str]]:
        """The headers of every request made for ``path`` so far."""
        return [headers for seen, headers in self.requests if seen == path]


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """An HTTP server on 127.0.0.1 serving the sample images and test bytes."""
    state = ImageServer()
    for path in sample_paths():
        kind = "image/jpeg" if path.suffix == ".jpg" else "image/png"
        state.files[f"/samples/{path.name}"] = _Served(path.read_bytes(), kind)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            state.requests.append((path, dict(self.headers.items())))
            served = state.files.get(path)
            if served is None:
                served = _Served(b'{"detail": "not found"}', "application/json")
                self.send_response(404)
            else:
                time.sleep(served.delay)
                self.send_response(200)
            self.send_header("Content-Type", served.content_type)
            if served.declare_length:
                self.send_header("Content-Length", str(len(served.data)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            # The provider may hang up once it has read enough: that is the
            # point of some tests, not an error of this server.
            with contextlib.suppress(ConnectionError):
                self.wfile.write(served.data)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client closing a kept-alive connection is how HTTP ends.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    yield state

    server.shutdown()
    server.server_close()


def wait_for_status(
    client: ProviderClient,
    prediction_id: str,
    done: Callable[[Any], bool] = lambda prediction: prediction.is_terminal,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
) -> list[Any]:
    """Poll until ``done(prediction)``; every state seen, the last one last."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        prediction = client.get(prediction_id)
        seen.append(prediction)
        if done(prediction):
            return seen
        if time.monotonic() > deadline:
            msg = f"prediction {prediction_id} is {prediction.status} after {timeout} s"
            raise AssertionError(msg)
        time.sleep(interval)
