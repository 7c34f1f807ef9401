"""The ``imageopt-database`` block: the PostgreSQL database imageopt keeps."""

from __future__ import annotations

from typing import Any, ClassVar

import psycopg
from prefect.blocks.core import Block
from psycopg.conninfo import conninfo_to_dict
from pydantic import ConfigDict, Field, SecretStr, field_validator


class DatabaseBlock(Block):
    """imageopt's PostgreSQL database: stores, jobs, items and their history."""

    # Validation errors would otherwise quote the rejected value, secret included.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name: ClassVar[str] = "imageopt database"
    _block_type_slug: ClassVar[str] = "imageopt-database"
    _description: ClassVar[str] = (
        "The PostgreSQL database imageopt keeps its stores, jobs and items in."
    )

    dsn: SecretStr = Field(
        title="DSN",
        description="A PostgreSQL URL (postgresql://user:password@host/db) or "
        "conninfo string; it may carry a password, so it is kept secret.",
    )

    @field_validator("dsn")
    @classmethod
    def _is_conninfo(cls, value: SecretStr) -> SecretStr:
        try:
            conninfo_to_dict(value.get_secret_value())
        except psycopg.ProgrammingError:
            # psycopg's message quotes the string, password included.
            msg = "the DSN is not a PostgreSQL URL or conninfo string"
            raise ValueError(msg) from None
        return value

    def settings_values(self) -> dict[str, Any]:
        """This block's values under the names :class:`Settings` gives them."""
        return {"database_url": self.dsn}
