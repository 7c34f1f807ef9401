"""Settings read from the environment, every name prefixed ``IMAGEOPT_``.

Three groups of them can live on the Prefect server instead, in saved blocks
(the types in ``blocks/``): ``IMAGEOPT_PROVIDER_BLOCK``,
``IMAGEOPT_DATABASE_BLOCK`` and ``IMAGEOPT_OPTIMIZER_BLOCK`` name them, and
the values a named block holds replace the environment's. Every caller (the
flows, the command, the provider client) goes through :func:`get_settings`,
so they all see the same values.

A loaded block is kept for ``BLOCK_CACHE_SECONDS``: a flow asks for the
settings several times a run, and each load is a round trip to the Prefect
API. A block edited on the server is therefore seen within that time, not at
once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from imageopt.errors import ConfigurationError
from imageopt.optimizer import Format

if TYPE_CHECKING:
    from prefect.blocks.core import Block

BLOCK_CACHE_SECONDS = 30.0


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("imageopt", appauthor=False))


class Settings(BaseSettings):
    """What imageopt reads from its environment.

    Secrets (the database URL may carry a password, the provider token always
    is one) are ``SecretStr``: they print as ``**********``.
    """

    model_config = SettingsConfigDict(env_prefix="IMAGEOPT_", extra="ignore")

    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL; unset means the embedded private cluster.",
    )
    home: Path = Field(
        default_factory=_default_home,
        description="Where the embedded cluster and local outputs live.",
    )
    provider_url: str | None = Field(
        default=None, description="Base URL of the prediction API."
    )
    provider_token: SecretStr | None = Field(
        default=None, description="Bearer token for the prediction API."
    )
    provider_model: str | None = Field(
        default=None,
        description="The model predictions run on, 'owner/name'; unset means "
        "imageopt/optimize.",
    )
    provider_version: str | None = Field(
        default=None,
        description="A model version id; when set, predictions run on it.",
    )
    storage_block: str | None = Field(
        default=None,
        description="A saved Prefect filesystem block for outputs, "
        "'block-type/name'; unset means output_folder.",
    )
    output_folder: Path | None = Field(
        default=None,
        description="A folder for outputs when no storage block is named; "
        "unset means home/outputs.",
    )
    default_format: Format = Field(
        default="auto", description="The output format of a job that names none."
    )
    default_quality: int = Field(
        default=80,
        ge=1,
        le=100,
        description="The lossy quality of a job that names none.",
    )
    provider_block: str | None = Field(
        default=None,
        description="A saved imageopt-provider block; its values replace the "
        "provider_* settings.",
    )
    database_block: str | None = Field(
        default=None,
        description="A saved imageopt-database block; its DSN replaces database_url.",
    )
    optimizer_block: str | None = Field(
        default=None,
        description="A saved imageopt-optimizer block; the limits, defaults and "
        "storage it sets replace the environment's.",
    )
    creates_per_minute: int = Field(default=600, gt=0)
    reads_per_minute: int = Field(default=3000, gt=0)
    max_in_flight: int = Field(
        default=100,
        gt=0,
        description="Items a flow run keeps in flight at once; bounds its threads.",
    )
    prediction_deadline: str = Field(
        default="30m",
        description="Cancel-After sent with each create: the provider cancels a "
        "prediction still unfinished by then.",
    )
    max_input_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    admission_burst_seconds: float = Field(
        default=3.0,
        ge=0.1,
        description="Tokens a rate banks while nobody waits, in seconds of that "
        "rate: the burst admission allows after a quiet spell.",
    )
    admission_lease_seconds: float = Field(
        default=15.0,
        ge=1.0,
        description="How long the slots and waiters of a process that stopped "
        "renewing them (it died) are kept before others take them back.",
    )
    admission_recovery_seconds: float = Field(
        default=30.0,
        gt=0,
        description="After a 429 the rate climbs back linearly, from nothing to "
        "the configured rate in this many seconds.",
    )


def get_settings() -> Settings:
    """The settings as the environment and the blocks it names give them now.

    The environment is read afresh on each call (it costs well under a
    millisecond), so a change to it is seen without a restart; blocks come
    from a cache of ``BLOCK_CACHE_SECONDS``.

    Raises:
        ConfigurationError: a named block is not saved, or no Prefect API
            answers to load it from.
    """
    settings = Settings()
    values: dict[str, Any] = {}
    for setting, block_type in _block_types().items():
        name = getattr(settings, setting)
        if name:
            values.update(_load_block(setting, block_type, name).settings_values())
    if not values:
        return settings

    # Values given to the constructor take precedence over the environment.
    return Settings(**values)


def _block_types() -> dict[str, type[Block]]:
    from blocks import DatabaseBlock, OptimizerBlock, ProviderBlock

    return {
        "provider_block": ProviderBlock,
        "database_block": DatabaseBlock,
        "optimizer_block": OptimizerBlock,
    }


_cache: dict[tuple[str, str, str], tuple[float, Block]] = {}
_cache_lock = threading.Lock()


def _load_block(setting: str, block_type: type[Block], name: str) -> Block:
    """The saved block ``name`` of ``block_type``, that ``setting`` names.

    ``name`` is the block's name, or its slug ``block-type/name``.
    """
    from prefect.settings import PREFECT_API_URL

    variable = f"IMAGEOPT_{setting.upper()}"
    slug = block_type.get_block_type_slug()
    name = name.removeprefix(f"{slug}/")
    api_url = PREFECT_API_URL.value()
    if not api_url:
        msg = (
            f"{variable} names the {slug} block {name!r}, but no Prefect API is "
            f"configured to load it from: set PREFECT_API_URL, or unset {variable} "
            "to use the environment's settings"
        )
        raise ConfigurationError(msg)

    key = (api_url, slug, name)
    with _cache_lock:
        loaded_at, block = _cache.get(key, (0.0, None))
    if block is not None and time.monotonic() - loaded_at < BLOCK_CACHE_SECONDS:
        return block

    block = _fetch(variable, block_type, name, api_url)
    with _cache_lock:
        _cache[key] = (time.monotonic(), block)

    return block


def forget_blocks() -> None:
    """Drop every cached block, so the next :func:`get_settings` loads them anew."""
    with _cache_lock:
        _cache.clear()


def _fetch(variable: str, block_type: type[Block], name: str, api_url: str) -> Block:
    import httpx
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    slug = block_type.get_block_type_slug()
    try:
        # _sync: a caller inside an event loop would otherwise get a coroutine.
        return block_type.load(name, _sync=True)
    except ValueError as exc:
        if not isinstance(exc.__cause__, ObjectNotFound):
            raise
        msg = (
            f"{variable} names the {slug} block {name!r}, which the Prefect API at "
            f"{api_url} does not have: save one by that name (`prefect block "
            f"register -m blocks` adds its type to the UI), or unset {variable}"
        )
        raise ConfigurationError(msg) from None
    except RuntimeError as exc:
        # Prefect raises it when the saved values fail the block's validation.
        # Only the fields' names and the rules are quoted, never the values,
        # which may be secret.
        if not isinstance(exc.__cause__, ValidationError):
            raise
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.__cause__.errors()
        )
        msg = (
            f"the {slug} block {name!r} that {variable} names is not valid "
            f"({problems}): save it again with valid values"
        )
        raise ConfigurationError(msg) from None
    except PrefectHTTPStatusError as exc:
        status = exc.response.status_code
        hint = (
            "set PREFECT_API_AUTH_STRING to the server's credentials"
            if status in (401, 403)
            else "see the Prefect server's log"
        )
        msg = (
            f"{variable} names the {slug} block {name!r}, but the Prefect API at "
            f"{api_url} answered {status} when asked for it: {hint}"
        )
        raise ConfigurationError(msg) from exc
    except (httpx.HTTPError, OSError) as exc:
        msg = (
            f"{variable} names the {slug} block {name!r}, but the Prefect API at "
            f"{api_url} did not answer ({type(exc).__name__}): start it or fix "
            f"PREFECT_API_URL, or unset {variable} to use the environment's settings"
        )
        raise ConfigurationError(msg) from exc
