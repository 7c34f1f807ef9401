"""``imageopt serve-provider``: the local prediction API.

The server module (Starlette, uvicorn, Pillow) is imported only when the
command runs, so other commands start without it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from imageopt.cli import EXIT_OK
from imageopt.errors import ConfigurationError

TOKEN_ENV = "IMAGEOPT_PROVIDER_SERVER_TOKEN"

# Options whose value goes into ProviderConfig under the same name; left out
# (None) they take ProviderConfig's default.
_CONFIG_OPTIONS = (
    "latency",
    "starting_time",
    "create_limit",
    "read_limit",
    "burst_seconds",
    "retry_after_in",
    "error_rate",
    "lost_create_rate",
    "lost_create_answer",
    "fail_rate",
    "aborted_rate",
    "stuck_rate",
    "throttle_rate",
    "throttle_window",
    "expired_output_rate",
    "create_delay",
    "output_delay",
    "output_ttl",
    "max_pixels",
    "max_bytes",
    "download_timeout",
    "seed",
    "max_predictions",
    "max_output_bytes",
    "result_cache",
    "workers",
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve-provider",
        help="run the local prediction API (Replicate's protocol)",
        description=(
            "Serve the imageopt/optimize model over Replicate's HTTP protocol, "
            "backed by the Pillow optimizer. Once it accepts requests it prints "
            "'imageopt provider listening on http://HOST:PORT'. The fault options "
            "make it behave like a loaded provider, for tests and benchmarks."
        ),
    )
    parser.set_defaults(handler=_serve)

    where = parser.add_argument_group("where and who")
    where.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    where.add_argument(
        "--port",
        type=int,
        default=8787,
        help="port to listen on; 0 picks a free one (default: %(default)s)",
    )
    where.add_argument(
        "--token",
        help=(
            "require 'Authorization: Bearer TOKEN' on API requests, else 401; "
            f"{TOKEN_ENV} does the same and keeps the token out of the process list"
        ),
    )
    where.add_argument(
        "--access-log", action="store_true", help="log every request (off: it is slow)"
    )

    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--latency",
        type=_latency,
        metavar="SECONDS|DIST",
        help=(
            "time a prediction spends processing, drawn for each one: 3 (fixed), "
            "uniform:1:5 (between 1 and 5 s) or lognormal:3:0.5 (median 3 s, "
            "sigma 0.5); the image work counts toward it (default: 0)"
        ),
    )
    timing.add_argument(
        "--starting-time",
        type=_latency,
        metavar="SECONDS|DIST",
        help="time a prediction spends in 'starting', same syntax (default: 0)",
    )

    limits = parser.add_argument_group("rate limits (answered 429)")
    limits.add_argument(
        "--create-limit",
        type=int,
        metavar="PER_MINUTE",
        help="creates a minute; 0 means no limit (default: 600, as Replicate)",
    )
    limits.add_argument(
        "--read-limit",
        type=int,
        metavar="PER_MINUTE",
        help=(
            "other API requests a minute (reads, lists, cancels); 0 means no limit "
            "(default: 3000, as Replicate)"
        ),
    )
    limits.add_argument(
        "--burst-seconds",
        type=float,
        metavar="SECONDS",
        help=(
            "how many seconds' worth of requests may come at once before the "
            "limits bite (default: 10)"
        ),
    )
    limits.add_argument(
        "--retry-after-in",
        choices=("body", "header", "both"),
        help=(
            "where a 429 says how long to wait: the JSON body's retry_after, the "
            "Retry-After header, or both (default: both)"
        ),
    )

    faults = parser.add_argument_group("injected faults (shares from 0 to 1)")
    faults.add_argument(
        "--error-rate",
        type=float,
        metavar="SHARE",
        help="API requests answered 503 before anything happens (default: 0)",
    )
    faults.add_argument(
        "--lost-create-rate",
        type=float,
        metavar="SHARE",
        help=(
            "creates that make the prediction and then lose the answer, so the "
            "client cannot know it exists (default: 0)"
        ),
    )
    faults.add_argument(
        "--lost-create-answer",
        choices=("500", "drop"),
        help=(
            "how a lost create answers: HTTP 500, or a connection closed in the "
            "middle of the body (default: 500)"
        ),
    )
    faults.add_argument(
        "--fail-rate",
        type=float,
        metavar="SHARE",
        help="predictions that end 'failed' (default: 0)",
    )
    faults.add_argument(
        "--aborted-rate",
        type=float,
        metavar="SHARE",
        help="predictions that end 'aborted' before processing (default: 0)",
    )
    faults.add_argument(
        "--stuck-rate",
        type=float,
        metavar="SHARE",
        help=(
            "predictions that stay 'starting' until canceled or their Cancel-After "
            "deadline passes (default: 0)"
        ),
    )
    faults.add_argument(
        "--throttle-rate",
        type=float,
        metavar="SHARE",
        help=(
            "API requests answered 429 (retry after 1 s) during the throttle "
            "window, on top of the rate limits (default: 0)"
        ),
    )
    faults.add_argument(
        "--throttle-window",
        type=float,
        metavar="SECONDS",
        help=(
            "how long --throttle-rate lasts, counted from the first API request "
            "(default: 30)"
        ),
    )
    faults.add_argument(
        "--expired-output-rate",
        type=float,
        metavar="SHARE",
        help=(
            "succeeded predictions whose output file has already expired (410) "
            "when it is fetched (default: 0)"
        ),
    )
    faults.add_argument(
        "--create-delay",
        type=_latency,
        metavar="SECONDS|DIST",
        help=(
            "time a create waits before answering, after the prediction is made; "
            "same syntax as --latency (default: 0)"
        ),
    )
    faults.add_argument(
        "--output-delay",
        type=_latency,
        metavar="SECONDS|DIST",
        help=(
            "time an output file download waits before answering; same syntax "
            "as --latency (default: 0)"
        ),
    )
    faults.add_argument(
        "--seed", type=int, help="seed of the fault and latency draws, for repeat runs"
    )

    guards = parser.add_argument_group("guards and memory")
    guards.add_argument(
        "--max-pixels",
        type=int,
        help="largest image in pixels a prediction decodes (default: the optimizer's)",
    )
    guards.add_argument(
        "--max-bytes",
        type=int,
        help="largest input image in bytes (default: the optimizer's)",
    )
    guards.add_argument(
        "--download-timeout",
        type=float,
        metavar="SECONDS",
        help="time allowed to fetch an input image (default: 30)",
    )
    guards.add_argument(
        "--allow-private-urls",
        action="store_true",
        help=(
            "fetch images from loopback, private and link-local addresses too "
            "(tests and the local demo need 127.0.0.1; never on a shared machine)"
        ),
    )
    guards.add_argument(
        "--output-ttl",
        type=float,
        metavar="SECONDS",
        help="how long output files stay downloadable (default: 3600, as Replicate)",
    )
    guards.add_argument(
        "--max-predictions",
        type=int,
        help="predictions remembered; the oldest go first (default: 200000)",
    )
    guards.add_argument(
        "--max-output-bytes",
        type=int,
        help="memory for output files; the oldest go first (default: 512 MiB)",
    )
    guards.add_argument(
        "--result-cache",
        type=int,
        metavar="RESULTS",
        help=(
            "results kept for reuse by predictions with the same image and options; "
            "0 turns reuse off (default: 64)"
        ),
    )
    guards.add_argument(
        "--workers",
        type=int,
        help="threads doing image work (default: the CPU count, at most 4)",
    )


def _latency(text: str) -> Any:
    from imageopt.provider_server import Latency

    try:
        return Latency.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from imageopt.provider_server import ProviderConfig, serve

    options = {
        name: getattr(args, name)
        for name in _CONFIG_OPTIONS
        if getattr(args, name) is not None
    }
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        config = ProviderConfig(
            token=token,
            allow_private_urls=args.allow_private_urls,
            access_log=args.access_log,
            **options,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in error['loc']).replace('_', '-')}: "
            f"{error['msg']}"
            if error["loc"]
            else error["msg"]
            for error in exc.errors(include_input=False)
        )
        raise ConfigurationError(f"cannot serve the provider: {problems}") from exc

    serve(config, args.host, args.port)
    return EXIT_OK
