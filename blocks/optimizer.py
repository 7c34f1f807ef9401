"""The ``imageopt-optimizer`` block: limits, output defaults and storage."""

from __future__ import annotations

from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, model_validator

from imageopt.optimizer import Format


class OptimizerBlock(Block):
    """How hard imageopt drives the provider, and what it makes and keeps.

    A field left empty is taken from the environment (or its default), so a
    block can change one limit and leave the rest alone.
    """

    _block_type_name: ClassVar[str] = "imageopt optimizer"
    _block_type_slug: ClassVar[str] = "imageopt-optimizer"
    _description: ClassVar[str] = (
        "imageopt's limits (creates and reads a minute, items in flight), the "
        "format and quality jobs get when they name none, and where outputs go. "
        "An empty field is taken from the environment."
    )

    creates_per_minute: int | None = Field(
        default=None,
        gt=0,
        description="Predictions created a minute, across every flow run; "
        "Replicate allows 600.",
    )
    reads_per_minute: int | None = Field(
        default=None,
        gt=0,
        description="Polls and other reads a minute; Replicate allows 3000.",
    )
    max_in_flight: int | None = Field(
        default=None, gt=0, description="Items in flight at once."
    )
    default_format: Format | None = Field(
        default=None, description="The output format of a job that names none."
    )
    default_quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="The lossy quality, 1 to 100, of a job that names none.",
    )
    storage_block: str | None = Field(
        default=None,
        description="A saved filesystem block for outputs, 'block-type/name' "
        "(local-file-system/outputs).",
    )
    output_folder: str | None = Field(
        default=None,
        description="A folder for outputs, on the machine that runs the flow.",
    )

    @model_validator(mode="after")
    def _one_storage(self) -> OptimizerBlock:
        if self.storage_block and self.output_folder:
            msg = "give a storage block or an output folder, not both"
            raise ValueError(msg)
        return self

    def settings_values(self) -> dict[str, Any]:
        """The values this block sets, under the names :class:`Settings` uses."""
        values = {
            name: getattr(self, name)
            for name in (
                "creates_per_minute",
                "reads_per_minute",
                "max_in_flight",
                "default_format",
                "default_quality",
            )
            if getattr(self, name) is not None
        }
        # Outputs go to one place: naming either replaces both.
        if self.storage_block:
            values.update(storage_block=self.storage_block, output_folder=None)
        elif self.output_folder:
            values.update(storage_block=None, output_folder=self.output_folder)

        return values
