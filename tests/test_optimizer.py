"""The optimizer against real images: the samples, and inputs built here."""

from __future__ import annotations

import functools
import io
import json
import logging
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import ExifTags, Image, ImageDraw
from pydantic import ValidationError

from imageopt.errors import ImageError
from imageopt.optimizer import (
    FORMATS,
    OptimizeOptions,
    OptimizeResult,
    optimize,
)
from imageopt.samples import sample_paths

SAMPLES = {path.name: path for path in sample_paths()}

# logo.png has an alpha channel that is opaque everywhere, so transparency is
# tested on the logo cut out along its circle.
CUTOUT = "logo-cutout.png"

BOUNDED_CASES = [
    (name, fmt)
    for name in [*SAMPLES, CUTOUT]
    for fmt in FORMATS
    if (name, fmt) != (CUTOUT, "jpeg")
]
TRANSPARENT_FORMATS = [fmt for fmt in FORMATS if fmt != "jpeg"]


@functools.cache
def input_bytes(name: str) -> bytes:
    if name != CUTOUT:
        return SAMPLES[name].read_bytes()

    logo = Image.open(SAMPLES["logo.png"]).convert("RGBA")
    mask = Image.new("L", logo.size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, logo.width - 1, logo.height - 1), fill=255)
    logo.putalpha(mask)
    return encode(logo, "PNG")


@functools.cache
def bounded(name: str, fmt: str) -> OptimizeResult:
    """The sample optimized into 300x300, computed once for all the tests."""
    options = OptimizeOptions(format=fmt, max_width=300, max_height=300)

    return optimize(input_bytes(name), options)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)

    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()

    return image


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and that holds none."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"

    return (
        signature + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    )


def gradient(mode: str) -> Image.Image:
    """A 64x48 gradient in ``mode``, with real transparency in alpha modes."""
    gray = Image.linear_gradient("L").resize((64, 48))
    if mode == "I" or mode.startswith("I;16"):
        return gray.convert("I").point(lambda v: v * 257).convert(mode)
    if mode == "P+transparency":
        image = gray.convert("RGB").quantize(16)
        image.info["transparency"] = 0
        return image

    image = gray.convert(mode)
    if "A" in mode:
        image.putalpha(gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return image


@pytest.mark.parametrize(("name", "fmt"), BOUNDED_CASES)
def test_the_output_decodes_as_the_format_it_claims(name: str, fmt: str) -> None:
    result = bounded(name, fmt)

    image = decode(result.data)
    assert image.format.lower() == result.format
    assert result.content_type == Image.MIME[image.format]
    assert result.format == fmt or fmt == "auto"


@pytest.mark.parametrize(("name", "fmt"), BOUNDED_CASES)
def test_the_output_fits_the_bounds_and_keeps_the_aspect_ratio(
    name: str, fmt: str
) -> None:
    source = decode(input_bytes(name))

    result = bounded(name, fmt)

    image = decode(result.data)
    assert image.size == (result.width, result.height)
    assert max(image.size) == 300
    assert abs(image.width - image.height * source.width / source.height) <= 1


@pytest.mark.parametrize(("name", "fmt"), BOUNDED_CASES)
def test_the_output_is_no_larger_than_the_input(name: str, fmt: str) -> None:
    result = bounded(name, fmt)

    assert result.bytes_in == len(input_bytes(name))
    assert result.bytes_out == len(result.data)
    assert result.bytes_out <= result.bytes_in


@pytest.mark.parametrize("fmt", TRANSPARENT_FORMATS)
def test_a_transparent_image_keeps_its_transparency(fmt: str) -> None:
    result = bounded(CUTOUT, fmt)

    image = decode(result.data)
    assert "A" in image.getbands()
    assert image.getchannel("A").getextrema()[0] < 255


def test_jpeg_is_refused_for_a_transparent_image() -> None:
    options = OptimizeOptions(format="jpeg")

    with pytest.raises(ImageError, match="transparency, which JPEG cannot keep"):
        optimize(input_bytes(CUTOUT), options)


def test_an_alpha_channel_opaque_everywhere_is_dropped() -> None:
    result = optimize(input_bytes("logo.png"), OptimizeOptions(format="png"))

    assert decode(result.data).mode == "RGB"


@pytest.mark.parametrize(
    ("name", "candidates"),
    [("chelsea.png", ("webp", "avif", "jpeg")), (CUTOUT, ("webp", "avif"))],
)
def test_auto_keeps_the_smallest_candidate(name: str, candidates: tuple) -> None:
    sizes = {fmt: bounded(name, fmt).bytes_out for fmt in candidates}

    result = bounded(name, "auto")

    assert result.bytes_out == min(sizes.values())
    assert sizes[result.format] == result.bytes_out


def test_the_exif_orientation_is_applied_and_then_dropped() -> None:
    # Stored 40x20, red on the left; orientation 6 turns it a quarter clockwise
    # for display, which puts the red on top.
    stored = Image.new("RGB", (40, 20), "red")
    stored.paste("blue", (20, 0, 40, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = encode(stored, "JPEG", quality=100, exif=exif)

    result = optimize(data, OptimizeOptions(format="jpeg"))

    image = decode(result.data)
    assert not result.kept_input
    assert (result.width, result.height) == image.size == (20, 40)
    top_red, _, top_blue = image.getpixel((10, 5))
    bottom_red, _, bottom_blue = image.getpixel((10, 35))
    assert top_red > 200 and top_blue < 60
    assert bottom_blue > 200 and bottom_red < 60
    assert not image.getexif()


@pytest.mark.parametrize("fmt", ["webp", "avif", "jpeg", "png"])
def test_metadata_is_stripped(fmt: str) -> None:
    photo = Image.open(SAMPLES["rocket.jpg"])
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "imageopt test camera"
    exif[ExifTags.Base.Orientation] = 1
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"></x:xmpmeta>'
    data = encode(photo, "JPEG", quality=95, exif=exif, comment=b"shot", xmp=xmp)
    options = OptimizeOptions(format=fmt, max_width=300)

    result = optimize(data, options)

    image = decode(result.data)
    assert not result.kept_input
    assert not image.getexif()
    assert not {"exif", "xmp", "XML:com.adobe.xmp", "comment"} & image.info.keys()


@pytest.mark.parametrize("fmt", ["webp", "avif", "jpeg", "png"])
def test_a_wide_gamut_colour_profile_is_kept(fmt: str) -> None:
    adobe_rgb = Image.open(SAMPLES["rocket.jpg"]).info["icc_profile"]

    result = bounded("rocket.jpg", fmt)

    assert decode(result.data).info.get("icc_profile") == adobe_rgb


@pytest.mark.parametrize("fmt", ["webp", "avif", "jpeg", "png"])
def test_an_srgb_colour_profile_is_dropped(fmt: str) -> None:
    result = bounded("chelsea.png", fmt)

    assert not decode(result.data).info.get("icc_profile")


COLOUR_MODE_CASES = [
    (mode, fmt)
    for mode in (
        *("1", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "YCbCr"),
        *("I;16", "I", "F"),
    )
    for fmt in FORMATS
    if not (fmt == "jpeg" and mode in ("LA", "RGBA", "P+transparency"))
]


@pytest.mark.parametrize(("mode", "fmt"), COLOUR_MODE_CASES)
def test_every_colour_mode_encodes_in_every_format(mode: str, fmt: str) -> None:
    # TIFF stores every mode but a palette's transparent index, PNG that.
    data = encode(gradient(mode), "PNG" if mode == "P+transparency" else "TIFF")

    result = optimize(data, OptimizeOptions(format=fmt, max_width=32))

    image = decode(result.data)
    assert image.size == (32, 24)
    assert image.mode in ("L", "LA", "RGB", "RGBA")
    assert ("A" in image.getbands()) == ("A" in mode or "transparency" in mode)


def test_sixteen_bit_gray_is_scaled_to_eight_bits_not_clipped() -> None:
    mid_gray = Image.new("I;16", (8, 8), 128 * 257)

    result = optimize(encode(mid_gray, "PNG"), OptimizeOptions(format="png"))

    assert decode(result.data).getpixel((4, 4)) == 128


def test_cmyk_is_converted_to_rgb() -> None:
    cyan = Image.new("CMYK", (64, 64), (255, 0, 0, 0))

    result = optimize(encode(cyan, "JPEG"), OptimizeOptions(format="webp"))

    red, green, blue = decode(result.data).getpixel((32, 32))
    assert red < 30 and green > 225 and blue > 225


def test_a_cmyk_image_with_an_unreadable_profile_is_converted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cyan = Image.new("CMYK", (64, 64), (255, 0, 0, 0))
    data = encode(cyan, "JPEG", icc_profile=b"not an ICC profile")

    with caplog.at_level(logging.WARNING, logger="imageopt.optimizer"):
        result = optimize(data, OptimizeOptions(format="webp"))

    assert decode(result.data).mode == "RGB"
    assert "colour profile is unreadable" in caplog.text


def test_an_image_within_the_bounds_is_not_enlarged() -> None:
    options = OptimizeOptions(format="webp", max_width=1000, max_height=1000)

    result = optimize(input_bytes("chelsea.png"), options)

    assert (result.width, result.height) == (451, 300)


def test_one_bound_scales_the_other_side_in_proportion() -> None:
    options = OptimizeOptions(format="webp", max_height=150)

    result = optimize(input_bytes("coffee.png"), options)

    assert decode(result.data).size == (225, 150)


def test_an_image_nothing_beats_is_returned_unchanged() -> None:
    pixel = encode(Image.new("L", (1, 1), 0), "PNG", optimize=True)

    result = optimize(pixel, OptimizeOptions(format="png"))

    assert result.kept_input
    assert result.data == pixel
    assert (result.format, result.content_type) == ("png", "image/png")
    assert result.bytes_out == result.bytes_in == len(pixel)


def test_an_unbeaten_input_is_returned_in_its_own_format() -> None:
    result = optimize(input_bytes("rocket.jpg"), OptimizeOptions(format="png"))

    assert result.kept_input
    assert (result.format, result.content_type) == ("jpeg", "image/jpeg")


def test_the_bounds_win_over_size_when_the_image_must_shrink() -> None:
    # A JPEG photo as lossless PNG grows, even at 600 pixels across instead
    # of 640; the image must fit, so the larger PNG is the answer.
    options = OptimizeOptions(format="png", max_width=600)

    result = optimize(input_bytes("rocket.jpg"), options)

    assert not result.kept_input
    assert (result.format, result.width) == ("png", 600)
    assert result.bytes_out > result.bytes_in


def test_a_phone_mpo_photo_is_read_as_a_jpeg() -> None:
    photo = Image.open(SAMPLES["rocket.jpg"])
    depth = photo.convert("L").convert("RGB")
    data = encode(photo, "MPO", save_all=True, append_images=[depth], quality=95)

    result = optimize(data, OptimizeOptions(format="webp"))

    assert decode(result.data).size == photo.size


def test_auto_leaves_out_webp_for_an_image_wider_than_webp_allows() -> None:
    strip = encode(Image.effect_noise((20000, 8), 64), "PNG")

    result = optimize(strip, OptimizeOptions())

    assert result.format in ("avif", "jpeg")


def test_webp_is_refused_for_an_image_wider_than_webp_allows() -> None:
    strip = encode(Image.linear_gradient("L").resize((20000, 8)), "PNG")

    with pytest.raises(ImageError, match="at most 16383"):
        optimize(strip, OptimizeOptions(format="webp"))


def test_an_empty_input_is_refused() -> None:
    with pytest.raises(ImageError, match=r"empty \(0 bytes\): upload the file again"):
        optimize(b"", OptimizeOptions())


def test_an_input_over_max_bytes_is_refused() -> None:
    data = input_bytes("text.png")

    with pytest.raises(ImageError, match="42,704 bytes, more than the limit of 1,000"):
        optimize(data, OptimizeOptions(), max_bytes=1000)


def test_an_html_page_is_refused_as_html() -> None:
    page = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>"

    with pytest.raises(ImageError, match="looks like an HTML page"):
        optimize(page, OptimizeOptions())


def test_random_bytes_are_refused_showing_their_start() -> None:
    data = bytes(range(7, 71))

    with pytest.raises(ImageError, match="starts with the bytes 07 08 09 0a"):
        optimize(data, OptimizeOptions())


def test_a_truncated_jpeg_is_refused() -> None:
    data = input_bytes("rocket.jpg")

    with pytest.raises(ImageError, match="truncated or corrupt") as caught:
        optimize(data[: len(data) // 2], OptimizeOptions())

    assert isinstance(caught.value.__cause__, OSError)


def test_a_truncated_png_is_refused() -> None:
    data = input_bytes("camera.png")

    with pytest.raises(ImageError, match="truncated or corrupt"):
        optimize(data[: len(data) // 2], OptimizeOptions())


def test_more_pixels_than_max_pixels_are_refused_before_decoding() -> None:
    # The PNG holds no pixel data: decoding it would fail as truncated.
    header_only = png_claiming(1000, 1000)

    with pytest.raises(ImageError, match="1,000,000 pixels, more than the limit"):
        optimize(header_only, OptimizeOptions(), max_pixels=999_999)


def test_a_bomb_over_the_default_pixel_limit_is_refused() -> None:
    header_only = png_claiming(8000, 8000)

    with pytest.raises(ImageError, match="64,000,000 pixels, more than the limit"):
        optimize(header_only, OptimizeOptions())


def test_a_bomb_beyond_pillows_own_ceiling_is_refused() -> None:
    header_only = png_claiming(100_000, 100_000)

    with pytest.raises(ImageError, match="too many pixels to decode safely"):
        optimize(header_only, OptimizeOptions(), max_pixels=10**11)


def test_an_animation_is_refused() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])

    with pytest.raises(ImageError, match="has 2 frames"):
        optimize(data, OptimizeOptions())


def test_concurrent_calls_give_the_same_bytes_as_one_at_a_time() -> None:
    cases = [(name, fmt) for name in SAMPLES for fmt in ("webp", "avif", "jpeg")]
    options = {fmt: OptimizeOptions(format=fmt, max_width=200) for fmt in FORMATS}

    def run(case: tuple[str, str]) -> bytes:
        name, fmt = case
        return optimize(input_bytes(name), options[fmt]).data

    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, cases))

    assert concurrent == [run(case) for case in cases]


@pytest.mark.parametrize(
    "fields",
    [
        {"quality": 0},
        {"quality": 101},
        {"max_width": -1},
        {"max_height": 0},
        {"format": "gif"},
        {"colour": "red"},
    ],
    ids=str,
)
def test_options_refuse_values_out_of_range(fields: dict) -> None:
    with pytest.raises(ValidationError):
        OptimizeOptions(**fields)


def test_metrics_are_a_json_dict_of_the_result() -> None:
    result = bounded("text.png", "webp")

    metrics = json.loads(json.dumps(result.metrics()))

    assert metrics == {
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "width": 300,
        "height": 115,
        "format": "webp",
        "kept_input": False,
        "encode_ms": result.encode_ms,
    }
