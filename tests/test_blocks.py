"""imageopt's Prefect blocks against a real Prefect server: registered by the
Prefect command, saved, loaded by name, used by the flow and the command, and
never showing a secret."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import (
    PREFECT_API_AUTH_STRING,
    PREFECT_API_URL,
    temporary_settings,
)
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from blocks import DatabaseBlock, OptimizerBlock, ProviderBlock
from imageopt.errors import ConfigurationError
from imageopt.migrate import run_migrations
from imageopt.provider import ProviderClient
from imageopt.samples import sample_paths
from imageopt.services import PrefectServerProcess, flush_to_prefect, free_port
from imageopt.settings import forget_blocks, get_settings

ROOT = Path(__file__).resolve().parent.parent
SLUGS = ("imageopt-provider", "imageopt-database", "imageopt-optimizer")
BLOCK_SETTINGS = (
    "IMAGEOPT_PROVIDER_BLOCK",
    "IMAGEOPT_DATABASE_BLOCK",
    "IMAGEOPT_OPTIMIZER_BLOCK",
)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def registered(prefect_api: str) -> subprocess.CompletedProcess:
    """The block types, registered the way a person would."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No provider, database or block in the environment; no block cached."""
    for name in (
        "IMAGEOPT_PROVIDER_URL",
        "IMAGEOPT_PROVIDER_TOKEN",
        "IMAGEOPT_DATABASE_URL",
        "IMAGEOPT_STORAGE_BLOCK",
        *BLOCK_SETTINGS,
    ):
        monkeypatch.delenv(name, raising=False)
    forget_blocks()

    return monkeypatch


@pytest.fixture
def every_log_record(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[logging.LogRecord]]:
    """Every record any logger of this process hands to its handlers.

    Taken where loggers call their handlers, so that it does not depend on
    which handlers Prefect's logging configuration leaves in place.
    """
    records: list[logging.LogRecord] = []
    call_handlers = logging.Logger.callHandlers

    def keep(self: logging.Logger, record: logging.LogRecord) -> None:
        records.append(record)
        call_handlers(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", keep)
    imageopt_logger = logging.getLogger("imageopt")
    level = imageopt_logger.level
    imageopt_logger.setLevel(logging.DEBUG)

    yield records

    imageopt_logger.setLevel(level)


def _imageopt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imageopt", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prefect_block_register_registers_the_three_block_types(
    prefect_api, registered
):
    with get_client(sync_client=True) as client:
        types = {slug: client.read_block_type_by_slug(slug) for slug in SLUGS}
        schemas = {
            slug: client.get_most_recent_block_schema_for_block_type(types[slug].id)
            for slug in SLUGS
        }

    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert {slug: types[slug].name for slug in SLUGS} == {
        "imageopt-provider": "imageopt provider",
        "imageopt-database": "imageopt database",
        "imageopt-optimizer": "imageopt optimizer",
    }
    assert schemas["imageopt-provider"].fields["secret_fields"] == ["token"]
    assert schemas["imageopt-database"].fields["secret_fields"] == ["dsn"]
    assert schemas["imageopt-optimizer"].fields["secret_fields"] == []


def test_saved_blocks_load_by_name_with_their_values(prefect_api, registered):
    token = _unique("token")
    names = {kind: _unique(kind) for kind in ("provider", "database", "optimizer")}
    ProviderBlock(base_url="http://127.0.0.1:9", version="v1", token=token).save(
        names["provider"]
    )
    DatabaseBlock(dsn="host=/tmp dbname=shop password=pw").save(names["database"])
    OptimizerBlock(reads_per_minute=1200, output_folder="/srv/out").save(
        names["optimizer"]
    )

    provider = ProviderBlock.load(names["provider"])
    database = DatabaseBlock.load(names["database"])
    optimizer = OptimizerBlock.load(names["optimizer"])

    assert provider.base_url == "http://127.0.0.1:9" and provider.version == "v1"
    assert provider.token.get_secret_value() == token
    assert database.dsn.get_secret_value() == "host=/tmp dbname=shop password=pw"
    assert optimizer.reads_per_minute == 1200
    assert optimizer.output_folder == "/srv/out"
    assert optimizer.creates_per_minute is None


def test_named_blocks_replace_the_environment_and_empty_fields_keep_it(
    prefect_api, registered, environment
):
    provider, optimizer = _unique("provider"), _unique("optimizer")
    ProviderBlock(
        base_url="http://127.0.0.1:9", version="abc123", token="from-block"
    ).save(provider)
    OptimizerBlock(reads_per_minute=1200, default_format="png").save(optimizer)
    environment.setenv("IMAGEOPT_PROVIDER_URL", "http://127.0.0.1:8")
    environment.setenv("IMAGEOPT_PROVIDER_TOKEN", "from-environment")
    environment.setenv("IMAGEOPT_CREATES_PER_MINUTE", "77")
    environment.setenv("IMAGEOPT_READS_PER_MINUTE", "99")
    environment.setenv("IMAGEOPT_PROVIDER_BLOCK", provider)
    environment.setenv("IMAGEOPT_OPTIMIZER_BLOCK", f"imageopt-optimizer/{optimizer}")

    settings = get_settings()

    assert settings.provider_url == "http://127.0.0.1:9"
    assert settings.provider_token.get_secret_value() == "from-block"
    assert settings.reads_per_minute == 1200
    assert settings.default_format == "png"
    assert settings.creates_per_minute == 77
    with ProviderClient.from_settings(settings) as client:
        assert "abc123" in repr(client)


def test_without_a_named_block_the_environment_is_used(environment):
    environment.setenv("IMAGEOPT_PROVIDER_URL", "http://127.0.0.1:8")
    environment.setenv("IMAGEOPT_CREATES_PER_MINUTE", "77")

    settings = get_settings()

    assert settings.provider_url == "http://127.0.0.1:8"
    assert settings.creates_per_minute == 77
    assert settings.provider_block is None


def test_a_block_is_loaded_again_only_after_the_cache_is_dropped(
    prefect_api, registered, environment
):
    name = _unique("optimizer")
    OptimizerBlock(max_in_flight=7).save(name)
    environment.setenv("IMAGEOPT_OPTIMIZER_BLOCK", name)
    first = get_settings().max_in_flight
    OptimizerBlock(max_in_flight=9).save(name, overwrite=True)

    cached = get_settings().max_in_flight
    forget_blocks()
    fresh = get_settings().max_in_flight

    assert (first, cached, fresh) == (7, 7, 9)


def test_a_job_runs_on_the_provider_database_and_storage_of_saved_blocks(
    prefect_api,
    registered,
    environment,
    make_database,
    provider_server,
    every_log_record,
    tmp_path: Path,
):
    """Nothing but the three block names in the environment: the command
    submits into the block's database with the block's default format, the
    flow reaches the provider with the block's URL and token and stores into
    the block's folder, and neither secret reaches a log."""
    token = _unique("provider-token")
    password = _unique("database-password")
    server = provider_server("--create-limit", "0", "--read-limit", "0", token=token)
    # The server trusts local connections, so a password is accepted and
    # ignored: it stands for the secret a real DSN carries.
    conninfo = make_conninfo(make_database(), password=password)
    run_migrations(conninfo)
    names = {kind: _unique(kind) for kind in ("provider", "database", "optimizer")}
    ProviderBlock(base_url=server.url, token=token).save(names["provider"])
    DatabaseBlock(dsn=conninfo).save(names["database"])
    outputs = tmp_path / "outputs"
    OptimizerBlock(
        default_format="png", default_quality=55, output_folder=str(outputs)
    ).save(names["optimizer"])
    blocks_env = {
        "IMAGEOPT_PROVIDER_BLOCK": names["provider"],
        "IMAGEOPT_DATABASE_BLOCK": names["database"],
        "IMAGEOPT_OPTIMIZER_BLOCK": names["optimizer"],
    }
    for key, value in blocks_env.items():
        environment.setenv(key, value)
    sources = [str(path) for path in sample_paths()[:2]]

    submitted = _imageopt("submit", "--store", "Block store", *sources, env={})
    job_id = int(submitted.stdout.strip().splitlines()[-1])
    from flows.optimize_job import optimize_job

    state = optimize_job(job_id=job_id, return_state=True)
    shown = _imageopt("status", str(job_id), "--json", env={})

    assert submitted.returncode == 0, submitted.stderr
    assert state.is_completed(), state.message
    report = json.loads(shown.stdout)
    assert report["job"]["params"] == {"format": "png", "quality": 55}
    assert [item["status"] for item in report["items"]] == ["COMPLETED"] * 2
    for item in report["items"]:
        assert Path(item["output"]).is_relative_to(outputs)
        assert Path(item["output"]).suffix == ".png"
        assert Path(item["output"]).is_file()
    stats = server.stats()
    assert stats["creates"] == 2 and stats["unauthorized"] == 0
    flow_logs = _flow_run_logs(state.state_details.flow_run_id)
    assert flow_logs, "the flow run sent no log lines to the API"
    assert any(record.name == "prefect.flow_runs" for record in every_log_record)
    written = [
        submitted.stdout + submitted.stderr,
        shown.stdout + shown.stderr,
        *flow_logs,
        *(record.getMessage() for record in every_log_record),
        server.log_text(),
    ]
    for secret in (token, password):
        assert not [text for text in written if secret in text]


def _flow_run_logs(flow_run_id: uuid.UUID) -> list[str]:
    flush_to_prefect()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )

    return [log.message for log in logs]


def test_the_api_and_reprs_show_block_secrets_obfuscated(prefect_api, registered):
    token, password = _unique("token"), _unique("password")
    provider = ProviderBlock(base_url="http://127.0.0.1:9", token=token)
    database = DatabaseBlock(dsn=f"postgresql://shop:{password}@db.internal/shop")
    provider_id = provider.save(_unique("provider"))
    database_id = database.save(_unique("database"))

    shown = [
        httpx.get(f"{prefect_api}/block_documents/{block_id}", timeout=10).json()
        for block_id in (provider_id, database_id)
    ]

    assert shown[0]["data"]["token"] == "********"
    assert shown[1]["data"]["dsn"] == "********"
    assert shown[0]["data"]["base_url"] == "http://127.0.0.1:9"
    for text in (repr(provider), str(provider), repr(database), json.dumps(shown)):
        assert token not in text and password not in text


def test_a_missing_block_is_an_error_of_one_line_naming_it_and_what_to_do(
    prefect_api, registered, environment
):
    environment.setenv("IMAGEOPT_PROVIDER_BLOCK", "no-such-provider")

    with pytest.raises(ConfigurationError) as raised:
        get_settings()
    command = _imageopt("status", "1", env={})

    message = str(raised.value)
    assert "\n" not in message
    assert "IMAGEOPT_PROVIDER_BLOCK" in message and "'no-such-provider'" in message
    assert "prefect block register -m blocks" in message
    assert command.returncode == 2
    assert command.stderr.strip().splitlines() == [f"imageopt status: {message}"]


def test_an_unreachable_prefect_api_is_an_error_naming_the_block(environment):
    environment.setenv("IMAGEOPT_DATABASE_BLOCK", "shop-database")
    closed = f"http://127.0.0.1:{free_port()}/api"

    with (
        temporary_settings({PREFECT_API_URL: closed}),
        pytest.raises(ConfigurationError) as raised,
    ):
        get_settings()

    message = str(raised.value)
    assert "\n" not in message
    assert "IMAGEOPT_DATABASE_BLOCK" in message and "'shop-database'" in message
    assert closed in message and "did not answer" in message


def test_a_named_block_without_a_prefect_api_is_an_error_saying_so(environment):
    environment.setenv("IMAGEOPT_OPTIMIZER_BLOCK", "limits")

    with (
        temporary_settings({PREFECT_API_URL: None}),
        pytest.raises(ConfigurationError) as raised,
    ):
        get_settings()

    message = str(raised.value)
    assert "'limits'" in message and "set PREFECT_API_URL" in message


def test_an_invalid_saved_block_is_an_error_that_does_not_quote_its_values(
    prefect_api, registered, environment
):
    name = _unique("database")
    secret = _unique("not-a-dsn")
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("imageopt-database")
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
        # Saved the way another tool could, past the block's own validation.
        response = client.request(
            "POST",
            "/block_documents/",
            json={
                "name": name,
                "data": {"dsn": f"{secret} = = ="},
                "block_type_id": str(block_type.id),
                "block_schema_id": str(schema.id),
            },
        )
        response.raise_for_status()
    environment.setenv("IMAGEOPT_DATABASE_BLOCK", name)

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    message = str(raised.value)
    assert name in message and "not a PostgreSQL URL" in message
    assert secret not in message


def test_a_database_block_refuses_a_dsn_that_is_not_one_without_quoting_it():
    with pytest.raises(ValueError) as raised:
        DatabaseBlock(dsn="secret-value = = =")

    assert "not a PostgreSQL URL" in str(raised.value)
    assert "secret-value" not in str(raised.value)


def test_the_database_url_is_the_dsn_of_the_named_database_block(
    prefect_api, registered, environment, make_database
):
    name = _unique("database")
    conninfo = make_database()
    DatabaseBlock(dsn=conninfo).save(name)
    environment.setenv("IMAGEOPT_DATABASE_BLOCK", name)
    from imageopt.db import database_url

    url = database_url()

    with psycopg.connect(url) as conn:
        (dbname,) = conn.execute("SELECT current_database()").fetchone()
    assert url == conninfo and dbname in conninfo


@pytest.fixture(scope="module")
def guarded_api(
    make_database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A Prefect server behind its own basic auth; its API URL and credentials."""
    credentials = f"imageopt:{_unique('password')}"
    conninfo = make_database()
    server = PrefectServerProcess(
        conninfo,
        dbname=conninfo_to_dict(conninfo)["dbname"],
        home=tmp_path_factory.mktemp("guarded-prefect-home"),
        extra_env={"PREFECT_SERVER_API_AUTH_STRING": credentials},
    )

    yield server.url, credentials

    server.stop()


def test_a_prefect_api_behind_basic_auth_gives_blocks_only_to_its_clients(
    guarded_api, environment
):
    api_url, credentials = guarded_api
    token = _unique("token")
    with temporary_settings(
        {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: credentials}
    ):
        ProviderBlock(base_url="http://127.0.0.1:9", token=token).save("shop")
    environment.setenv("IMAGEOPT_PROVIDER_BLOCK", "shop")

    with (
        temporary_settings({PREFECT_API_URL: api_url}),
        pytest.raises(ConfigurationError) as refused,
    ):
        get_settings()
    anonymous = httpx.post(f"{api_url}/block_documents/filter", timeout=10)
    with temporary_settings(
        {PREFECT_API_URL: api_url, PREFECT_API_AUTH_STRING: credentials}
    ):
        settings = get_settings()

    assert anonymous.status_code == 401
    assert "401" in str(refused.value)
    assert "PREFECT_API_AUTH_STRING" in str(refused.value)
    assert settings.provider_token.get_secret_value() == token
