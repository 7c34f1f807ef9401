"""``imageopt admission`` and ``imageopt store set``: who waits, who is served."""

from __future__ import annotations

import argparse
import json
from typing import Any

from imageopt.admission import Limits, has_shared_state, read_snapshot
from imageopt.cli import EXIT_OK
from imageopt.db import Database, database_url
from imageopt.errors import InvalidRequestError, SchemaError
from imageopt.migrate import current_version
from imageopt.records import ensure_store
from imageopt.settings import get_settings


def register(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser(
        "admission",
        help="show the rates, the slots in flight and each store's share",
        description=(
            "Show admission as every process sharing the database sees it: the "
            "create and read rates allowed now (lower for a while after the "
            "provider throttled) and the grants of the last minute, the slots "
            "of predictions in flight, and for each store with waiters, slots "
            "or recent grants: its weight, its waiting items and reads, and its "
            "share of the grants."
        ),
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)

    store = commands.add_parser(
        "store",
        help="manage stores",
        description="Manage the stores that jobs belong to.",
    )
    actions = store.add_subparsers(dest="action", metavar="ACTION", required=True)
    set_cmd = actions.add_parser(
        "set",
        help="set a store's weight, creating the store if it is new",
        description=(
            "Set a store's weight: while several stores have items waiting, "
            "each gets a share of the provider's capacity in proportion to its "
            "weight. A new store is created. Running flows use the new weight "
            "from their next grant on."
        ),
    )
    set_cmd.add_argument("store", metavar="STORE", help="the store's name")
    set_cmd.add_argument(
        "--weight",
        type=int,
        required=True,
        metavar="N",
        help="a whole number of 1 or more; stores start at 1",
    )
    set_cmd.set_defaults(handler=_store_set)


def _show(args: argparse.Namespace) -> int:
    settings = get_settings()
    with Database(database_url(settings), max_size=1) as db, db.connection() as conn:
        if not has_shared_state(conn):
            msg = (
                f"the database schema is at version {current_version(conn)}, "
                "without admission's tables: each process admits on its own and "
                "nothing is shared to show; run `imageopt migrate`"
            )
            raise SchemaError(msg)
        snapshot = read_snapshot(conn, Limits.from_settings(settings))

    if args.json:
        print(json.dumps(snapshot, indent=2))
    else:
        print(_render(snapshot))

    return EXIT_OK


def _render(snapshot: dict[str, Any]) -> str:
    lines = []
    for kind, rate in snapshot["rates"].items():
        line = (
            f"{kind:<7} {rate['allowed_per_minute']:>7g} a minute allowed now "
            f"(configured {rate['per_minute']:g}), "
            f"{rate['granted_last_minute']} granted in the last minute"
        )
        if rate["paused_for"]:
            line += f"; paused {rate['paused_for']:g} s more after a 429"
        lines.append(line)
    lines.append(
        f"in flight: {snapshot['in_flight']} of {snapshot['max_in_flight']} slots, "
        f"{snapshot['agents']} process(es) admitting"
    )
    lines.append("")

    if not snapshot["stores"]:
        lines.append("no store is waiting, in flight or served in the last minute")
        return "\n".join(lines)

    header = (
        f"{'store':<24} {'weight':>6} {'waiting items':>13} {'waiting reads':>13} "
        f"{'in flight':>9} {'creates/min':>11} {'share':>5} "
        f"{'reads/min':>9} {'share':>5}"
    )
    lines.append(header)
    for row in snapshot["stores"]:
        name = row["name"] or f"#{row['store_id']} (deleted)"
        lines.append(
            f"{name[:24]:<24} {row['weight']:>6} {row['waiting_items']:>13} "
            f"{row['waiting_reads']:>13} {row['in_flight']:>9} "
            f"{row['creates_last_minute']:>11} {row['create_share']:>5.0%} "
            f"{row['reads_last_minute']:>9} {row['read_share']:>5.0%}"
        )

    return "\n".join(lines)


def _store_set(args: argparse.Namespace) -> int:
    if args.weight < 1:
        msg = f"--weight is a whole number of 1 or more, not {args.weight}"
        raise InvalidRequestError(msg)

    with (
        Database(database_url(), max_size=1) as db,
        db.connection() as conn,
        conn.transaction(),
    ):
        (existed,) = conn.execute(
            "SELECT count(*) FROM stores WHERE name = %s", (args.store,)
        ).fetchone()
        store_id = ensure_store(conn, args.store, weight=args.weight)
        conn.execute(
            "UPDATE stores SET weight = %s WHERE id = %s", (args.weight, store_id)
        )

    what = "set" if existed else "created"
    print(f"store {args.store!r} (id {store_id}) {what} with weight {args.weight}")

    return EXIT_OK
