"""How much each format saves on the sample images, and what it costs in time.

Reproduce from the repository root, in the project's virtualenv::

    python bench/optimizer.py            # every sample, timed over 3 rounds
    python -m bench optimizer --quick    # 3 samples, 1 round

Each format runs at quality 80 with no size bounds, over the samples in
``imageopt/samples``. An image the format refuses (JPEG for a transparent
image) is left out of that format's totals and named under ``skipped``.
``bytes_saved`` is ``bytes_in - bytes_out`` over those images and
``saved_percent`` its share of ``bytes_in``. ``encode_ms_mean``, the time an
image takes, is ``OptimizeResult.encode_ms`` (decode, transform and encode)
averaged over images and rounds, after one untimed warm-up encode per format
so library start-up is not counted. ``kept_input`` counts the images no
encoding beat, returned as they were.
"""

from __future__ import annotations

import io
import json
import statistics

from PIL import Image

from imageopt.errors import ImageError
from imageopt.optimizer import OptimizeOptions, optimize
from imageopt.samples import sample_paths

BENCH_FORMATS = ("webp", "avif", "jpeg", "png", "auto")
QUALITY = 80
# One photo, one graphic, one grayscale scan: each kind the encoders differ on.
QUICK_SAMPLES = ("rocket.jpg", "logo.png", "text.png")


def run(quick: bool = False) -> list[dict]:
    """One result per format, totals over the sample images."""
    paths = sample_paths()
    if quick:
        paths = [path for path in paths if path.name in QUICK_SAMPLES]
    images = {path.name: path.read_bytes() for path in paths}
    rounds = 1 if quick else 3

    return [_bench_format(fmt, images, rounds) for fmt in BENCH_FORMATS]


def _bench_format(fmt: str, images: dict[str, bytes], rounds: int) -> dict:
    options = OptimizeOptions(format=fmt, quality=QUALITY)
    optimize(_warm_up_image(), options)

    bytes_in = bytes_out = kept_input = 0
    encode_ms: list[float] = []
    skipped: list[str] = []
    for name, data in images.items():
        try:
            results = [optimize(data, options) for _ in range(rounds)]
        except ImageError:
            skipped.append(name)
            continue
        bytes_in += results[0].bytes_in
        bytes_out += results[0].bytes_out
        kept_input += results[0].kept_input
        encode_ms.extend(result.encode_ms for result in results)

    saved = 100 * (1 - bytes_out / bytes_in) if bytes_in else 0.0
    return {
        "bench": "optimizer",
        "format": fmt,
        "quality": QUALITY,
        "images": len(images) - len(skipped),
        "skipped": skipped,
        "kept_input": kept_input,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "bytes_saved": bytes_in - bytes_out,
        "saved_percent": round(saved, 1),
        "encode_ms_mean": round(statistics.fmean(encode_ms), 1) if encode_ms else None,
    }


def _warm_up_image() -> bytes:
    """A small opaque photo-like PNG that every format accepts."""
    out = io.BytesIO()
    Image.effect_noise((64, 64), 32).convert("RGB").save(out, "PNG")

    return out.getvalue()


if __name__ == "__main__":
    for result in run():
        print(json.dumps(result), flush=True)
