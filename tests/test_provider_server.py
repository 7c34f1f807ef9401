"""The provider server, run as ``imageopt serve-provider`` and spoken to over HTTP."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from provider_fixtures import ProviderServer, start_provider_server, wait_for_status

from imageopt.errors import RejectedError
from imageopt.provider import PredictionStatus, ProviderClient
from imageopt.provider_server import MODEL_VERSION
from imageopt.samples import sample_paths

SAMPLES = {path.name: path for path in sample_paths()}
PIL_FORMATS = {"webp": "WEBP", "avif": "AVIF", "jpeg": "JPEG", "png": "PNG"}
FORMAT_CASES = [(name, fmt) for name in SAMPLES for fmt in PIL_FORMATS]


def _transparent_logo() -> bytes:
    """logo.png with its white background made transparent.

    The sample's own alpha channel is opaque everywhere, and the optimizer
    rightly drops such a channel, so it cannot show that alpha is kept.
    """
    with Image.open(SAMPLES["logo.png"]) as logo:
        image = logo.convert("RGBA")
    white = Image.eval(image.convert("L"), lambda v: 0 if v == 255 else 255)
    image.putalpha(white)
    out = io.BytesIO()
    image.save(out, "PNG")

    return out.getvalue()


@pytest.fixture(scope="module")
def transparent_logo_url(image_server) -> str:
    return image_server.put("/transparent/logo.png", _transparent_logo(), "image/png")


@pytest.fixture(scope="module")
def client(shared_provider_server) -> ProviderClient:
    return shared_provider_server.client()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("name", "image_format"), FORMAT_CASES)
def test_each_sample_image_is_optimized_in_every_format(
    client, image_server, name, image_format
):
    """The output downloads, decodes as the asked format, fits the bounds and
    is not larger than the input."""
    options = {"format": image_format, "max_width": 256, "max_height": 256}

    prediction = client.create(
        {"image": image_server.sample_url(name), **options}, wait=60
    )
    data = client.download(prediction.output["image"])

    assert prediction.status == PredictionStatus.SUCCEEDED, prediction.error
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == PIL_FORMATS[image_format]
        assert image.size == (prediction.output["width"], prediction.output["height"])
        assert max(image.size) <= 256
    assert len(data) == prediction.output["bytes_out"]
    assert len(data) <= SAMPLES[name].stat().st_size


@pytest.mark.parametrize("image_format", ["webp", "avif", "png"])
def test_a_transparent_image_keeps_its_transparency(
    client, transparent_logo_url, image_format
):
    prediction = client.create(
        {"image": transparent_logo_url, "format": image_format, "max_width": 256},
        wait=60,
    )
    data = client.download(prediction.output["image"])

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == PIL_FORMATS[image_format]
        alpha = image.convert("RGBA").getchannel("A")
    assert alpha.getextrema() == (0, 255)


def test_a_transparent_image_asked_as_jpeg_fails_with_the_transparency_reason(
    client, transparent_logo_url
):
    prediction = client.create(
        {"image": transparent_logo_url, "format": "jpeg"}, wait=60
    )

    assert prediction.status == PredictionStatus.FAILED
    assert "transparency" in prediction.error


def test_a_data_uri_input_is_optimized(client):
    data = SAMPLES["rocket.jpg"].read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()

    prediction = client.create({"image": uri, "format": "webp", "max_width": 100})

    final = wait_for_status(client, prediction.id)[-1]
    assert final.status == PredictionStatus.SUCCEEDED
    assert final.output["width"] == 100
    assert final.output["format"] == "webp"
    assert final.metrics["predict_time"] >= 0


@pytest.mark.parametrize(
    ("kind", "data", "reason"),
    [
        ("empty", b"", "empty"),
        ("truncated", SAMPLES["camera.png"].read_bytes()[:2000], "truncated"),
        ("html", b"<!doctype html><html><body>Log in</body></html>", "HTML page"),
        ("bomb", _png_header_only(8000, 8000), "64,000,000 pixels"),
    ],
)
def test_an_unusable_image_fails_its_prediction_with_the_reason(
    client, image_server, kind, data, reason
):
    url = image_server.put(f"/unusable/{kind}", data, "image/png")

    prediction = client.create({"image": url}, wait=60)

    assert prediction.status == PredictionStatus.FAILED
    assert reason in prediction.error


@pytest.mark.parametrize("declare_length", [True, False])
def test_an_image_over_the_byte_limit_fails(
    provider_server, image_server, declare_length
):
    """Refused from its Content-Length, or cut off while streaming without one."""
    server = provider_server("--allow-private-urls", "--max-bytes", "50000")
    url = image_server.put(
        f"/big-{declare_length}.png",
        SAMPLES["coffee.png"].read_bytes(),
        "image/png",
        declare_length=declare_length,
    )

    prediction = server.client().create({"image": url}, wait=30)

    assert prediction.status == PredictionStatus.FAILED
    assert "over the limit of 50000" in prediction.error


def test_an_image_slower_than_the_download_timeout_fails(provider_server, image_server):
    server = provider_server("--allow-private-urls", "--download-timeout", "0.5")
    url = image_server.put("/slow.png", SAMPLES["text.png"].read_bytes(), delay=2)

    prediction = server.client().create({"image": url}, wait=30)

    assert prediction.status == PredictionStatus.FAILED
    assert "took longer than 0.5 s" in prediction.error


@pytest.fixture(scope="module")
def public_only_server(tmp_path_factory) -> Iterator[ProviderServer]:
    """A provider without --allow-private-urls."""
    server = start_provider_server(tmp_path_factory.mktemp("provider"))

    yield server

    server.stop()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_loopback_url_is_refused_without_allow_private_urls(
    public_only_server, image_server, host
):
    path = f"/private-{host}.png"
    url = image_server.put(path, SAMPLES["text.png"].read_bytes())
    url = url.replace("127.0.0.1", host)

    prediction = public_only_server.client().create({"image": url}, wait=30)

    assert prediction.status == PredictionStatus.FAILED
    assert f"refused to fetch the image from {host}" in prediction.error
    assert "a loopback address" in prediction.error
    assert image_server.headers_of(path) == []


def test_a_prediction_is_seen_starting_then_processing_while_latency_is_high(
    provider_server, image_server
):
    server = provider_server(
        "--allow-private-urls", "--starting-time", "0.6", "--latency", "0.6"
    )
    client = server.client()

    prediction = client.create({"image": image_server.sample_url("text.png")})
    seen = wait_for_status(client, prediction.id)

    statuses = [p.status for p in seen]
    order = [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]
    assert order == ["starting", "processing", "succeeded"]


def test_fail_rate_one_fails_every_prediction(provider_server, image_server):
    server = provider_server("--allow-private-urls", "--fail-rate", "1")
    client = server.client()

    predictions = [
        client.create({"image": image_server.sample_url("text.png")}, wait=30)
        for _ in range(3)
    ]

    assert {p.status for p in predictions} == {PredictionStatus.FAILED}
    assert all("fail-rate" in p.error for p in predictions)
    assert server.stats()["faults"]["failed"] == 3


def test_aborted_rate_one_aborts_every_prediction(provider_server, image_server):
    server = provider_server("--allow-private-urls", "--aborted-rate", "1")
    client = server.client()

    prediction = client.create({"image": image_server.sample_url("text.png")}, wait=30)

    assert prediction.status == PredictionStatus.ABORTED
    assert prediction.is_terminal
    assert prediction.started_at is None
    assert server.stats()["faults"]["aborted"] == 1


def test_cancel_stops_a_slow_prediction(provider_server, image_server):
    server = provider_server("--allow-private-urls", "--latency", "30")
    client = server.client()
    prediction = client.create({"image": image_server.sample_url("text.png")})

    canceled = client.cancel(prediction.id)

    assert canceled.status == PredictionStatus.CANCELED
    assert client.get(prediction.id).status == PredictionStatus.CANCELED
    assert client.get(prediction.id).output is None


def test_a_stuck_prediction_is_canceled_at_its_cancel_after_deadline(
    provider_server, image_server
):
    server = provider_server("--allow-private-urls", "--stuck-rate", "1")
    client = server.client()
    started = time.monotonic()

    prediction = client.create(
        {"image": image_server.sample_url("text.png")}, cancel_after="1s"
    )
    seen = wait_for_status(client, prediction.id)

    assert seen[0].status == PredictionStatus.STARTING
    assert seen[-1].status == PredictionStatus.CANCELED
    assert time.monotonic() - started >= 1.0
    assert server.stats()["faults"]["stuck"] == 1


def test_cancel_of_a_finished_prediction_returns_it_unchanged(client, image_server):
    prediction = client.create({"image": image_server.sample_url("text.png")}, wait=30)

    canceled = client.cancel(prediction.id)

    assert canceled.status == PredictionStatus.SUCCEEDED
    assert canceled.output == prediction.output
    assert canceled.completed_at == prediction.completed_at


def test_an_invalid_input_is_answered_422_at_create(client, image_server):
    with pytest.raises(RejectedError) as caught:
        client.create({"image": image_server.sample_url("text.png"), "quality": 500})

    assert caught.value.status_code == 422
    assert "input.quality" in str(caught.value)


def test_an_unknown_model_is_answered_404(shared_provider_server, image_server):
    client = shared_provider_server.client(model="someone/else")

    with pytest.raises(RejectedError) as caught:
        client.create({"image": image_server.sample_url("text.png")})

    assert caught.value.status_code == 404
    assert "someone/else" in str(caught.value)


def test_a_create_by_version_runs_the_model(shared_provider_server, image_server):
    client = shared_provider_server.client(version=MODEL_VERSION)

    prediction = client.create({"image": image_server.sample_url("text.png")}, wait=30)

    assert prediction.status == PredictionStatus.SUCCEEDED
    assert prediction.version == MODEL_VERSION


def test_the_list_is_paged_newest_first(provider_server):
    server = provider_server("--stuck-rate", "1", "--create-limit", "0")
    client = server.client()
    ids = [client.create({"image": "https://example.com/a.png"}).id for _ in range(120)]

    first = httpx.get(f"{server.url}/v1/predictions").json()
    second = httpx.get(first["next"]).json()

    assert [p["id"] for p in first["results"]] == ids[::-1][:100]
    assert [p["id"] for p in second["results"]] == ids[::-1][100:]
    assert second["next"] is None


def test_an_expired_output_answers_410(provider_server, image_server):
    server = provider_server("--allow-private-urls", "--output-ttl", "1")
    prediction = server.client().create(
        {"image": image_server.sample_url("text.png")}, wait=30
    )
    assert httpx.get(prediction.output["image"]).status_code == 200

    time.sleep(1.2)
    answer = httpx.get(prediction.output["image"])

    assert answer.status_code == 410
    assert "expired" in answer.json()["detail"]


@pytest.fixture(scope="module")
def token_server(tmp_path_factory) -> Iterator[ProviderServer]:
    server = start_provider_server(
        tmp_path_factory.mktemp("provider"), token="the-right-token"
    )

    yield server

    server.stop()


@pytest.mark.parametrize("authorization", ["Bearer not-the-token", None])
def test_a_wrong_or_missing_token_is_answered_401(token_server, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    answer = httpx.get(f"{token_server.url}/v1/predictions", headers=headers)

    assert answer.status_code == 401
    assert "authentication token" in answer.json()["detail"]


def test_the_right_token_is_accepted(token_server):
    answer = httpx.get(
        f"{token_server.url}/v1/predictions",
        headers={"Authorization": "Bearer the-right-token"},
    )

    assert answer.status_code == 200


def test_requests_over_the_read_limit_are_answered_429_with_the_wait(provider_server):
    server = provider_server("--read-limit", "60", "--burst-seconds", "1")
    url = f"{server.url}/v1/predictions"

    answers = [httpx.get(url) for _ in range(2)]

    assert [a.status_code for a in answers] == [200, 429]
    assert answers[1].json()["retry_after"] == 1
    assert answers[1].headers["Retry-After"] == "1"
    assert "throttled" in answers[1].json()["detail"]


def test_an_injected_5xx_comes_before_any_side_effect(provider_server):
    server = provider_server("--error-rate", "1")

    answer = httpx.post(
        f"{server.url}/v1/models/imageopt/optimize/predictions",
        json={"input": {"image": "https://example.com/a.png"}},
    )

    assert answer.status_code == 503
    stats = server.stats()
    assert stats["create_requests"] == 1
    assert stats["creates"] == 0
    assert stats["faults"]["errors_5xx"] == 1


def test_serve_provider_help_lists_every_option():
    options = [
        "--host",
        "--port",
        "--token",
        "--access-log",
        "--latency",
        "--starting-time",
        "--create-limit",
        "--read-limit",
        "--burst-seconds",
        "--retry-after-in",
        "--error-rate",
        "--lost-create-rate",
        "--lost-create-answer",
        "--fail-rate",
        "--aborted-rate",
        "--stuck-rate",
        "--seed",
        "--max-pixels",
        "--max-bytes",
        "--download-timeout",
        "--allow-private-urls",
        "--output-ttl",
        "--max-predictions",
        "--max-output-bytes",
        "--result-cache",
        "--workers",
    ]

    done = subprocess.run(
        [sys.executable, "-m", "imageopt", "serve-provider", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert [o for o in options if o not in done.stdout] == []
    assert "lognormal:3:0.5" in done.stdout


def test_serve_provider_refuses_outcome_rates_over_one():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imageopt",
            "serve-provider",
            "--fail-rate",
            "0.7",
            "--stuck-rate",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert "add up to 1.2" in done.stderr
