"""Make an image smaller with Pillow: orient, strip, fit, re-encode, keep the best.

``optimize`` is a pure function of its arguments: it reads no settings,
mutates no module or Pillow state, and can run in many threads at once.

What it does to an image, in order:

1. Refuse what cannot or should not be decoded: empty or oversized input, data
   that is not an image, more pixels than ``max_pixels`` (checked from the
   header, before any pixel is decoded), animations, truncated files.
2. Turn the pixels upright as the EXIF orientation says, then drop every piece
   of metadata (EXIF, XMP, comments) except a colour profile that matters.
3. Scale down, never up, to fit ``max_width`` x ``max_height``.
4. Encode in the requested format, or for ``auto`` in every fitting format,
   and keep the smallest.
5. Return the input itself when nothing beat it (see ``optimize``).
"""

from __future__ import annotations

import io
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Literal, get_args

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from imageopt.errors import ImageError

logger = logging.getLogger(__name__)

Format = Literal["auto", "webp", "avif", "jpeg", "png"]
FORMATS: tuple[str, ...] = get_args(Format)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

# Only the formats a product image arrives in. Leaving the rest out of
# Image.open keeps Pillow's rarer parsers (and EPS, which runs Ghostscript)
# away from uploaded bytes.
READABLE = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
READABLE_NAMES = "JPEG, PNG, WebP, AVIF, GIF, BMP or TIFF"

# What Pillow raises for a file that starts like an image and then breaks:
# OSError for truncation and decoder errors, SyntaxError for PNG chunk and
# checksum errors, the others from plugins reading malformed headers.
_BROKEN_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

_CONTENT_TYPES = {
    "webp": "image/webp",
    "avif": "image/avif",
    "jpeg": "image/jpeg",
    "png": "image/png",
}

# The largest width or height each encoder accepts: WEBP_MAX_DIMENSION in
# libwebp's encode.h and JPEG_MAX_DIMENSION in libjpeg's jmorecfg.h. AVIF and
# PNG allow far more than max_pixels leaves room for.
_MAX_SIDE = {"webp": 16383, "jpeg": 65500}


class OptimizeOptions(BaseModel):
    """How to optimize an image: target format, lossy quality and size bounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Format = "auto"
    quality: int = Field(80, ge=1, le=100)
    max_width: int | None = Field(None, gt=0)
    max_height: int | None = Field(None, gt=0)


@dataclass(frozen=True)
class OptimizeResult:
    """The optimized image and what it cost.

    ``format`` is the format of ``data``: one of webp, avif, jpeg, png, or when
    ``kept_input`` is true the input's own format (``"gif"``, ``"tiff"``...).
    ``width`` and ``height`` are as displayed, after the EXIF orientation.
    """

    data: bytes = field(repr=False)
    format: str
    content_type: str
    width: int
    height: int
    bytes_in: int
    bytes_out: int
    kept_input: bool
    encode_ms: float

    def metrics(self) -> dict:
        """The numbers worth recording, as a JSON-able dict."""
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "kept_input": self.kept_input,
            "encode_ms": self.encode_ms,
        }


def optimize(
    data: bytes,
    options: OptimizeOptions,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> OptimizeResult:
    """Re-encode ``data`` as ``options`` ask, as small as the format allows.

    The result is never larger than the input, with one exception. When the
    best encoding is not smaller than ``data`` and the image already fitted the
    bounds, ``data`` itself comes back unchanged with ``kept_input=True``, so
    it also keeps its metadata and its own format. When the image had to be
    scaled down, the scaled encoding comes back even if it is larger: an image
    that breaks the bounds is not an answer, while a larger file is. That
    happens when a format that suits the picture is swapped for one that does
    not, such as a JPEG photo asked for as PNG.

    Raises ``ImageError`` for input that cannot be optimized, and for a JPEG
    asked of an image with transparency. Pillow's own decompression bomb
    ceiling, ``2 * Image.MAX_IMAGE_PIXELS``, still applies above
    ``max_pixels``; between ``Image.MAX_IMAGE_PIXELS`` and that ceiling Pillow
    also emits a ``DecompressionBombWarning``, which is left alone because
    silencing it needs ``warnings.catch_warnings``, and that swaps the
    process-wide filter list and is not thread-safe. With the default
    ``max_pixels`` such an image is refused here anyway.
    """
    _check_size(data, max_bytes)
    started = time.perf_counter()

    image, input_format = _decode(data, max_pixels)
    decoded_size = image.size
    image, icc_profile = _normalise_mode(image)
    image = _fit(image, options.max_width, options.max_height)
    # Everything else in info (EXIF, XMP, comments, DPI) is metadata the
    # encoders would copy across; the profile goes back in per format.
    image.info = {}

    candidates = _candidates(options.format, image)
    encodings = {
        fmt: _encode(image, fmt, options.quality, icc_profile) for fmt in candidates
    }
    best = min(encodings, key=lambda fmt: len(encodings[fmt]))
    encode_ms = (time.perf_counter() - started) * 1000

    width, height = image.size
    if len(encodings[best]) >= len(data) and image.size == decoded_size:
        logger.debug(
            "kept the %s input of %s bytes: its best encoding, %s, took %s",
            input_format,
            len(data),
            best,
            len(encodings[best]),
        )
        return OptimizeResult(
            data=data,
            format=input_format,
            content_type=Image.MIME[input_format.upper()],
            width=width,
            height=height,
            bytes_in=len(data),
            bytes_out=len(data),
            kept_input=True,
            encode_ms=encode_ms,
        )

    logger.debug(
        "optimized a %sx%s %s image from %s to %s bytes as %s in %.0f ms",
        width,
        height,
        input_format,
        len(data),
        len(encodings[best]),
        best,
        encode_ms,
    )
    return OptimizeResult(
        data=encodings[best],
        format=best,
        content_type=_CONTENT_TYPES[best],
        width=width,
        height=height,
        bytes_in=len(data),
        bytes_out=len(encodings[best]),
        kept_input=False,
        encode_ms=encode_ms,
    )


def _check_size(data: bytes, max_bytes: int) -> None:
    if not data:
        msg = "the image is empty (0 bytes): upload the file again"
        raise ImageError(msg)
    if len(data) > max_bytes:
        msg = (
            f"the image is {len(data):,} bytes, more than the limit of "
            f"{max_bytes:,} bytes: shrink or re-export it before uploading"
        )
        raise ImageError(msg)


def _decode(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """The upright, fully decoded image and the input's format, lowercase."""
    try:
        image = Image.open(io.BytesIO(data), formats=READABLE)
    except UnidentifiedImageError as exc:
        msg = (
            f"the data is not an image imageopt can read ({describe_start(data)}): "
            f"upload a {READABLE_NAMES} file"
        )
        raise ImageError(msg) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(exc)) from exc
    except _BROKEN_IMAGE_ERRORS as exc:
        raise ImageError(_broken_message(exc)) from exc

    # Image.open has read only the header so far, so this refuses a
    # decompression bomb before its pixels take any memory.
    width, height = image.size
    if width * height > max_pixels:
        msg = (
            f"the image is {width}x{height}, {width * height:,} pixels, more than "
            f"the limit of {max_pixels:,} that guards against decompression "
            "bombs: scale it down and upload it again"
        )
        raise ImageError(msg)

    input_format = "jpeg" if image.format == "MPO" else image.format.lower()
    try:
        _refuse_animation(image)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(exc)) from exc
    except _BROKEN_IMAGE_ERRORS as exc:
        raise ImageError(_broken_message(exc)) from exc

    return image, input_format


def _refuse_animation(image: Image.Image) -> None:
    # A phone's MPO file is a JPEG followed by extra views (depth, stereo); its
    # first frame is the photo. Other frames are an animation or the pages of
    # a TIFF, which one still frame would silently lose.
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        msg = (
            f"the image has {frames} frames (an animation or several pages) and "
            "imageopt optimizes still images only: upload a single frame"
        )
        raise ImageError(msg)


def _bomb_message(exc: Image.DecompressionBombError) -> str:
    # Pillow's own ceiling, reached before max_pixels could be checked.
    return f"the image has too many pixels to decode safely ({exc}): scale it down"


def _broken_message(exc: BaseException) -> str:
    return (
        f"the image is truncated or corrupt ({exc}): upload it again, or "
        "re-export it from the original"
    )


def describe_start(data: bytes) -> str:
    """A guess at what the bytes are, for a message about a non-image."""
    start = data[:512].lstrip().lower()
    if start.startswith(b"<!doctype html") or b"<html" in start:
        return "it looks like an HTML page, perhaps an error or login page"
    if b"<svg" in start:
        return "it looks like SVG, a vector format imageopt does not rasterise"
    if start.startswith(b"<"):
        return "it looks like XML or HTML"
    if start.startswith((b"{", b"[")):
        return "it looks like JSON"
    if start.startswith(b"%pdf"):
        return "it is a PDF document"
    # ISO-BMFF brands (ISO/IEC 23008-12): iPhones save photos as HEIC.
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        return "it is HEIC/HEIF, which Pillow cannot read; export it as JPEG"
    return f"it starts with the bytes {data[:8].hex(' ')}"


def _normalise_mode(image: Image.Image) -> tuple[Image.Image, bytes | None]:
    """The image in L, LA, RGB or RGBA, and the colour profile that fits it.

    Those four modes cover what every encoder here accepts, and LANCZOS needs
    them: Pillow resizes palette and bilevel images with NEAREST only.
    """
    icc_profile = image.info.get("icc_profile")
    mode = image.mode

    if mode == "I" or mode.startswith("I;16"):
        # Integer samples are taken as 16-bit, as PNG and TIFF store them:
        # Pillow's own conversion to L would clip everything above 255 to
        # white. Float (F) samples have no such convention and are left to
        # Pillow, which reads them as 0-255.
        image = image.convert("I").point(lambda v: v / 257).convert("L")
    elif mode == "CMYK":
        image, icc_profile = _cmyk_to_rgb(image, icc_profile)

    gray = image.mode in ("1", "L", "LA", "La")
    target = "L" if gray else "RGB"
    if image.has_transparency_data:
        target += "A"
    try:
        image = image.convert(target) if image.mode != target else image
    except ValueError as exc:
        msg = f"imageopt cannot convert the {mode} colour mode: save the image as RGB"
        raise ImageError(msg) from exc

    # An alpha channel that is opaque everywhere is common (exports, screenshots)
    # and would rule JPEG out and cost bytes in every other format.
    if target.endswith("A") and image.getchannel("A").getextrema()[0] == 255:
        image = image.convert(target[:-1])

    return image, icc_profile


def _cmyk_to_rgb(
    image: Image.Image, icc_profile: bytes | None
) -> tuple[Image.Image, bytes | None]:
    """RGB pixels for a CMYK image, through its own profile when it has one.

    A CMYK profile cannot describe RGB pixels, so none is kept: a converted
    image is sRGB, which browsers assume for an image without a profile.
    """
    if icc_profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            return ImageCms.profileToProfile(
                image, source, srgb, outputMode="RGB"
            ), None
        except (OSError, ImageCms.PyCMSError):
            logger.warning(
                "the CMYK image's colour profile is unreadable: converting it "
                "without one, so its colours may shift"
            )

    return image.convert("RGB"), None


def _fit(
    image: Image.Image, max_width: int | None, max_height: int | None
) -> Image.Image:
    """The image scaled down to fit the bounds, or itself when it fits."""
    width, height = image.size
    scale = min(
        max_width / width if max_width else 1.0,
        max_height / height if max_height else 1.0,
    )
    if scale >= 1:
        return image

    # width * (max_width / width) can land a hair under max_width in floating
    # point: round() puts it back, and never lifts a side over its bound.
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Pillow's Image.resize documentation: with reducing_gap of 3 or more, the
    # cheap integer reduction done first is indistinguishable from a full
    # LANCZOS resample in most cases.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _candidates(requested: str, image: Image.Image) -> list[str]:
    """The formats to encode: the one requested, or auto's choice."""
    transparent = image.mode in ("LA", "RGBA")
    longest = max(image.size)

    if requested != "auto":
        if requested == "jpeg" and transparent:
            msg = (
                "the image has transparency, which JPEG cannot keep: ask for "
                "webp, avif, png or auto"
            )
            raise ImageError(msg)
        if longest > _MAX_SIDE.get(requested, longest):
            msg = (
                f"{requested} cannot store an image {longest} pixels across "
                f"(at most {_MAX_SIDE[requested]}): set max_width and max_height, "
                "or ask for another format"
            )
            raise ImageError(msg)
        return [requested]

    # PNG is lossless, and at any quality a caller would choose a lossy format
    # is far smaller (measured on the samples: 3 to 25 times) and several
    # times faster to encode. Where PNG would win, on a tiny graphic, the
    # input is usually a PNG already and kept as it is.
    candidates = ["webp", "avif"] if transparent else ["webp", "avif", "jpeg"]
    return [fmt for fmt in candidates if longest <= _MAX_SIDE.get(fmt, longest)]


def _encode(
    image: Image.Image, fmt: str, quality: int, icc_profile: bytes | None
) -> bytes:
    if fmt == "webp":
        # WebP has no grayscale mode.
        image = image.convert("RGBA" if image.mode in ("LA", "RGBA") else "RGB")
        # method 4 is libwebp's own default. Method 6 saved 5% on most
        # samples (12% on the scanned text) and nothing on a 3000x2000 photo,
        # for 1.5 to 3 times the time.
        options = {"quality": quality, "method": 4}
    elif fmt == "avif":
        image = image.convert("RGBA") if image.mode == "LA" else image
        # Measured on 2 cores, a 3000x2000 photo at quality 80: speed 6 took
        # 1.7 s for 293 KB, speed 8 0.7 s for 344 KB, and speed 7 was no
        # faster than 6. Pillow's default of 6 is worth its time.
        options = {"quality": quality, "speed": 6}
    elif fmt == "jpeg":
        options = {"quality": quality, "optimize": True, "progressive": True}
    else:
        # PNG stays lossless, so quality does not apply: a palette reduction
        # would be lossy without saying so. optimize means zlib level 9, which
        # is 7 times slower than the default 6 on large photos for about 5%
        # less; photos belong in the lossy formats, where auto puts them.
        options = {"optimize": True}

    profile = _profile_for(image.mode, icc_profile)
    if profile:
        options["icc_profile"] = profile

    out = io.BytesIO()
    try:
        image.save(out, fmt.upper(), **options)
    except (OSError, ValueError) as exc:
        width, height = image.size
        msg = (
            f"the {fmt} encoder failed on the {width}x{height} image ({exc}): "
            "ask for another format"
        )
        raise ImageError(msg) from exc

    return out.getvalue()


def _profile_for(mode: str, icc_profile: bytes | None) -> bytes | None:
    """The colour profile worth embedding with pixels in ``mode``, if any.

    A profile is kept for colour fidelity: an Adobe RGB or Display P3 photo
    shown without its profile is read as sRGB and looks dull. An sRGB profile
    is dropped, because browsers assume sRGB for an image without one and the
    profile costs about 3 KB, 10% of a typical product photo. So is a profile
    whose colour space (gray, RGB) no longer matches the pixels.
    """
    if not icc_profile:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        space = profile.profile.xcolor_space.strip()
        description = ImageCms.getProfileDescription(profile)
    except (OSError, ImageCms.PyCMSError):
        return None

    expected = "GRAY" if mode in ("L", "LA") else "RGB"
    if space != expected or description.lstrip().startswith("sRGB"):
        return None

    return icc_profile
