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
    creates_per_minute: int = Field(default=600, gt=0)
    reads_per_minute: int = Field(default=3000, gt=0)
    max_in_flight: int = Field(default=200, gt=0)


def get_settings() -> Settings:
    """The settings as the environment gives them now.

    Read afresh on each call (it costs well under a millisecond), so a change
    to the environment is seen without a restart.
    """
    return Settings()
