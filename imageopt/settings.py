"""Settings read from the environment, every name prefixed ``IMAGEOPT_``."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    storage_block: str | None = Field(
        default=None,
        description="A saved Prefect filesystem block for outputs, "
        "'block-type/name'; unset means a folder under home.",
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
    """The settings as the environment gives them now.

    Read afresh on each call (it costs well under a millisecond), so a change
    to the environment is seen without a restart.
    """
    return Settings()
