"""The ``imageopt-provider`` block: where the prediction API is and its token."""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator


class ProviderBlock(Block):
    """A prediction API that speaks Replicate's protocol, and how to call it."""

    # Validation errors would otherwise quote the rejected value, secret included.
    model_config = ConfigDict(hide_input_in_errors=True)

    _block_type_name: ClassVar[str] = "imageopt provider"
    _block_type_slug: ClassVar[str] = "imageopt-provider"
    _description: ClassVar[str] = (
        "The prediction API imageopt sends images to (Replicate, or "
        "`imageopt serve-provider`): its base URL, the model or version to run, "
        "and its token."
    )

    base_url: str = Field(
        title="Base URL",
        description="https://api.replicate.com, or the URL `imageopt "
        "serve-provider` prints.",
    )
    model: str | None = Field(
        default=None,
        description="The model predictions run on, 'owner/name'; empty means "
        "imageopt/optimize.",
    )
    version: str | None = Field(
        default=None,
        description="A model version id; when set, predictions run on it "
        "instead of the model.",
    )
    token: SecretStr | None = Field(
        default=None,
        description="The API token, sent as 'Authorization: Bearer'; empty for "
        "a provider that asks for none.",
    )

    @field_validator("base_url")
    @classmethod
    def _is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            msg = "the base URL must start with http:// or https://"
            raise ValueError(msg)
        return value

    def settings_values(self) -> dict[str, Any]:
        """This block's values under the names :class:`Settings` gives them."""
        return {
            "provider_url": self.base_url,
            "provider_model": self.model,
            "provider_version": self.version,
            "provider_token": self.token,
        }
