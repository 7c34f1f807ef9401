"""The provider client, against the real provider server over loopback."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from provider_fixtures import ProviderServer, start_provider_server
from pydantic import SecretStr

from imageopt.errors import (
    ConfigurationError,
    CreateOutcomeUnknownError,
    PredictionNotFoundError,
    ProviderError,
    ProviderUnavailableError,
    RejectedError,
    ThrottledError,
)
from imageopt.provider import (
    Prediction,
    PredictionStatus,
    ProviderClient,
    RetryPolicy,
)
from imageopt.settings import Settings

# Nothing is fetched for these: the predictions fail, get stuck or are never made.
NOWHERE = {"image": "https://example.com/product.png", "format": "webp"}
TOKEN = "the-right-token"


@pytest.fixture(scope="module")
def client(shared_provider_server) -> ProviderClient:
    return shared_provider_server.client()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory) -> Iterator[ProviderServer]:
    """A provider that wants TOKEN; its predictions stay starting."""
    server = start_provider_server(
        tmp_path_factory.mktemp("provider"), "--stuck-rate", "1", token=TOKEN
    )

    yield server

    server.stop()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_get_waits_out_a_429_for_the_time_the_provider_asked(
    provider_server, image_server
):
    server = provider_server(
        "--allow-private-urls", "--read-limit", "60", "--burst-seconds", "1"
    )
    client = server.client()
    prediction = client.create({"image": image_server.sample_url("text.png")})
    client.get(prediction.id)
    started = time.monotonic()

    read = client.get(prediction.id)

    assert read.id == prediction.id
    assert time.monotonic() - started >= 1.0
    assert server.stats()["throttled"] == 1


@pytest.mark.parametrize("where", ["body", "header"])
def test_a_throttled_create_raises_throttled_error_with_the_wait(
    provider_server, where
):
    server = provider_server(
        "--stuck-rate",
        "1",
        "--create-limit",
        "6",
        "--burst-seconds",
        "1",
        "--retry-after-in",
        where,
    )
    client = server.client()
    client.create(NOWHERE)

    with pytest.raises(ThrottledError) as caught:
        client.create(NOWHERE)

    assert caught.value.retry_after == 10
    assert server.stats()["creates"] == 1


def test_reads_are_retried_through_injected_5xx(provider_server):
    server = provider_server("--stuck-rate", "1", "--error-rate", "0.5", "--seed", "7")
    client = server.client(retry=RetryPolicy(max_attempts=12, base_delay=0.01))
    prediction = None
    while prediction is None:
        # A 503 to a create made nothing, so sending it again is safe.
        with contextlib.suppress(ProviderUnavailableError):
            prediction = client.create(NOWHERE)

    reads = [client.get(prediction.id) for _ in range(10)]

    assert {read.id for read in reads} == {prediction.id}
    assert server.stats()["faults"]["errors_5xx"] > 0


def test_a_create_is_not_retried_after_a_5xx(provider_server):
    server = provider_server("--error-rate", "1")

    with pytest.raises(ProviderUnavailableError):
        server.client().create(NOWHERE)

    stats = server.stats()
    assert stats["create_requests"] == 1
    assert stats["creates"] == 0


@pytest.mark.parametrize("answer", ["500", "drop"])
def test_a_lost_create_is_reconciled_without_a_second_prediction(
    provider_server, answer
):
    server = provider_server(
        "--stuck-rate", "1", "--lost-create-rate", "1", "--lost-create-answer", answer
    )
    client = server.client()
    sent_at = datetime.now(UTC)

    with pytest.raises(CreateOutcomeUnknownError):
        client.create(NOWHERE)
    found = client.reconcile(NOWHERE, since=sent_at)

    assert found is not None
    assert found.input == NOWHERE
    stats = server.stats()
    assert stats["create_requests"] == 1
    assert stats["creates"] == 1


def test_reconcile_finds_nothing_when_no_prediction_has_the_input(client):
    client.create({**NOWHERE, "quality": 11})

    assert client.reconcile({**NOWHERE, "quality": 12}) is None


def test_reconcile_ignores_predictions_made_before_since(client):
    client.create({**NOWHERE, "quality": 13})

    later = datetime.now(UTC) + timedelta(minutes=10)
    assert client.reconcile({**NOWHERE, "quality": 13}, since=later) is None


def test_reconcile_skips_excluded_predictions(client):
    older = client.create({**NOWHERE, "quality": 14})
    newer = client.create({**NOWHERE, "quality": 14})

    found = client.reconcile({**NOWHERE, "quality": 14}, exclude={newer.id})

    assert found is not None
    assert found.id == older.id


def test_iter_predictions_follows_the_next_cursors(provider_server):
    server = provider_server("--stuck-rate", "1", "--create-limit", "0")
    client = server.client()
    ids = [client.create(NOWHERE).id for _ in range(130)]

    listed = [p.id for p in client.iter_predictions()]

    assert listed == ids[::-1]


def test_a_create_to_a_closed_port_is_unavailable_not_unknown():
    client = ProviderClient(f"http://127.0.0.1:{_closed_port()}")

    with client, pytest.raises(ProviderUnavailableError):
        client.create(NOWHERE)


def test_get_of_an_unknown_prediction_raises_prediction_not_found(client):
    with pytest.raises(PredictionNotFoundError, match="no-such-id"):
        client.get("no-such-id")


def test_a_wrong_token_raises_rejected_error_401(token_server):
    with pytest.raises(RejectedError) as caught:
        token_server.client(token="a-wrong-token").list()

    assert caught.value.status_code == 401
    assert "refused the token" in str(caught.value)


def test_a_missing_token_raises_rejected_error_401(token_server):
    with pytest.raises(RejectedError) as caught:
        token_server.client(token=None).create(NOWHERE)

    assert caught.value.status_code == 401


def test_the_right_token_works(token_server):
    client = token_server.client(token=SecretStr(TOKEN))

    prediction = client.create(NOWHERE)

    assert client.get(prediction.id).status == PredictionStatus.STARTING


def test_the_token_appears_in_no_error_repr_or_log(provider_server, caplog):
    """Requests fail in every way the client knows; none of it shows the token."""
    token = "tok-7f3a-DISTINCTIVE-c91e"
    lossy = provider_server(
        "--lost-create-rate",
        "1",
        "--lost-create-answer",
        "drop",
        "--read-limit",
        "60",
        "--burst-seconds",
        "1",
        token=token,
    )
    broken = provider_server("--error-rate", "1", token=token)
    once = RetryPolicy(max_attempts=1)
    clients = [
        lossy.client(retry=once),
        lossy.client(token="not-it", retry=once),
        broken.client(retry=once),
        ProviderClient(f"http://127.0.0.1:{_closed_port()}", token, retry=once),
    ]
    attempts = [
        lambda c: c.create(NOWHERE),
        lambda c: c.get("no-such-id"),
        lambda c: c.get("no-such-id"),
        lambda c: c.cancel("no-such-id"),
        lambda c: c.list(),
        lambda c: c.download(f"{lossy.url}/outputs/none/output.webp"),
    ]
    caplog.set_level(logging.DEBUG)

    errors = []
    for client in clients:
        for attempt in attempts:
            with pytest.raises(ProviderError) as caught:
                attempt(client)
            errors.append(caught.value)

    kinds = {type(error) for error in errors}
    assert {
        CreateOutcomeUnknownError,
        ThrottledError,
        PredictionNotFoundError,
        RejectedError,
        ProviderUnavailableError,
    } <= kinds
    shown = [str(e) for e in errors] + [repr(e) for e in errors]
    shown += [repr(e.__cause__) for e in errors] + [str(e.__cause__) for e in errors]
    shown += [repr(client) for client in clients]
    assert [text for text in shown if token in text] == []
    assert caplog.records
    assert token not in caplog.text
    assert token not in lossy.log_text() + broken.log_text()
    clients[-1].close()


def test_an_expired_output_raises_a_clear_error(provider_server, image_server):
    server = provider_server("--allow-private-urls", "--output-ttl", "1")
    client = server.client()
    prediction = client.create({"image": image_server.sample_url("text.png")}, wait=30)
    time.sleep(1.2)

    with pytest.raises(RejectedError) as caught:
        client.download(prediction.output["image"])

    assert caught.value.status_code == 410
    assert "expire" in str(caught.value)


def test_download_sends_the_token_only_to_the_provider_host(token_server, image_server):
    url = image_server.put("/elsewhere.bin", b"not for the provider")

    data = token_server.client().download(url)

    assert data == b"not for the provider"
    assert "Authorization" not in image_server.headers_of("/elsewhere.bin")[0]


def test_download_stops_past_max_bytes(client, image_server):
    url = image_server.put("/large.bin", b"x" * 100_000, declare_length=False)

    with pytest.raises(ProviderError, match="over the limit of 1000 bytes"):
        client.download(url, max_bytes=1000)


def test_from_settings_without_a_provider_url_raises_configuration_error():
    with pytest.raises(ConfigurationError, match="IMAGEOPT_PROVIDER_URL"):
        ProviderClient.from_settings(Settings(provider_url=None))


def test_from_settings_uses_the_url_and_token(token_server):
    settings = Settings(provider_url=token_server.url, provider_token=TOKEN)

    with ProviderClient.from_settings(settings) as client:
        prediction = client.create(NOWHERE)

    assert prediction.status == PredictionStatus.STARTING


def test_a_prediction_ignores_fields_it_does_not_know():
    prediction = Prediction.model_validate(
        {
            "id": "abc",
            "status": "aborted",
            "input": {},
            "source": "web",
            "data_removed": True,
            "deployment": None,
        }
    )

    assert prediction.is_terminal
    assert prediction.status == PredictionStatus.ABORTED
