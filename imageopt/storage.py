"""Where optimized images are kept: a Prefect filesystem block.

Outputs are copied as soon as a prediction succeeds, since the provider's
output URLs expire (about an hour after completion on Replicate). The place
is a Prefect filesystem block: ``IMAGEOPT_STORAGE_BLOCK`` (or the optimizer
block's ``storage_block``) names a saved block
(``local-file-system/imageopt-outputs``, ``remote-file-system/...``), else a
local folder is used: the one ``imageopt run --output DIR`` gives, else
``IMAGEOPT_OUTPUT_FOLDER`` (or the optimizer block's ``output_folder``), else
``$IMAGEOPT_HOME/outputs``.

Each output goes to ``<store>/job-<job>/<item>-<name>.<format>``; the same
item always maps to the same path, so copying again after a crash overwrites
rather than duplicates.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from prefect.blocks.core import Block
from prefect.filesystems import LocalFileSystem, WritableFileSystem

from imageopt.errors import ConfigurationError
from imageopt.settings import Settings, get_settings

# Path separators and control characters cannot be part of one path segment;
# everything else in a store's or file's name (quotes, spaces, any script)
# is kept as it is.
_UNSAFE = re.compile(r"[/\\\x00-\x1f]")


def load_storage(
    output: str | Path | None = None, settings: Settings | None = None
) -> WritableFileSystem:
    """The filesystem outputs go to: ``output`` if given, else the settings'."""
    settings = settings or get_settings()
    if output is not None:
        return LocalFileSystem(basepath=str(Path(output).absolute()))
    if settings.storage_block:
        block = Block.load(settings.storage_block)
        if not isinstance(block, WritableFileSystem):
            msg = (
                f"the storage block {settings.storage_block!r} (IMAGEOPT_STORAGE_BLOCK"
                f" or the optimizer block's) is a {type(block).__name__}: outputs "
                "need a writable filesystem block such as local-file-system/NAME"
            )
            raise ConfigurationError(msg)
        return block

    folder = settings.output_folder or settings.home / "outputs"
    return LocalFileSystem(basepath=str(folder.absolute()))


def output_path(store: str, job_id: int, item_id: int, source: str, fmt: str) -> str:
    """The relative path an item's output is stored under."""
    stem = PurePosixPath(source.split("?", 1)[0].rstrip("/")).stem or "image"
    extension = "jpg" if fmt == "jpeg" else fmt
    return str(
        PurePosixPath(
            _segment(store), f"job-{job_id}", f"{item_id}-{_segment(stem)}.{extension}"
        )
    )


def _segment(name: str) -> str:
    cleaned = _UNSAFE.sub("_", name).strip()
    if cleaned in ("", ".", ".."):
        return "_"
    return cleaned


def location(storage: WritableFileSystem, path: str) -> str:
    """Where a stored output can be found, for people and for status output."""
    basepath = getattr(storage, "basepath", None)
    if basepath:
        return str(PurePosixPath(basepath) / path)
    return path
