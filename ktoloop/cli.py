"""The ``ktoloop`` command: one table of subcommand groups, each owned by its stage's ``cli`` module.

Handlers are plain functions ``(args, settings) -> int``; the logic lives in the stage packages so the
Prefect flows call exactly the same functions. Stage modules are imported lazily so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from ktoloop.config import Settings, load_settings
from ktoloop.errors import KtoLoopError

# group name -> module with ``add_commands(subparsers)``, in pipeline order: the order shown in --help.
COMMAND_MODULES: dict[str, str] = {
    "broker": "ingest.cli",
    "ingest": "ingest.cli",
    "dataset": "flows.cli",
    "reference": "training.cli",
    "train": "training.cli",
    "reward": "training.cli",
    "ppo": "training.cli",
    "evaluate": "monitoring.cli",
    "models": "flows.cli",
    "monitor": "monitoring.cli",
    "retrain": "flows.cli",
    "serve": "flows.cli",
    "demo": "ktoloop.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktoloop", description="Feedback from Kafka -> DuckDB -> snapshot -> KTO/DPO/IPO/PPO -> gated promotion. "
        "Commands are listed in pipeline order.",
        epilog="Every command checks the whole config file before it starts. `ktoloop COMMAND --help` lists its "
        "options.")
    parser.add_argument("--config", help="TOML config file; relative paths in it are relative to it "
                        "(default: $KTOLOOP_CONFIG or ./ktoloop.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in dict.fromkeys(COMMAND_MODULES.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # a stage not built yet
            raise
        module.add_commands(sub)
    # each module adds its groups together; list them in the table's (pipeline) order instead
    rank = {name: i for i, name in enumerate(COMMAND_MODULES)}
    sub._choices_actions.sort(key=lambda action: rank.get(action.dest, len(rank)))
    return parser


def existing_store(settings: Settings):
    """The store, or None (and a note naming the file) when there is none yet: a list command never creates one,
    so a command run against the wrong home says so instead of showing an empty store."""
    from ktoloop.store import Store

    if not settings.db_path.exists():
        print(f"ktoloop: no DuckDB file at {settings.db_path} yet (home {settings.home_dir}); nothing has been "
              "ingested there. Wrong folder? Pass --config or set $KTOLOOP_HOME", file=sys.stderr)
        return None
    return Store(settings.db_path, settings.store.lock_timeout_s)


def main(argv: list[str] | None = None) -> int:
    # Prefect reads its settings once, when first imported: what it must see is set before any stage loads
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from an offline box
    # the in-process (ephemeral) API server needs more than Prefect's 20 s to start on 2 busy cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its retries are noise; we report failures ourselves
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    if args.config:  # Prefect flows (in-process or served) load their settings from the same file
        os.environ["KTOLOOP_CONFIG"] = str(Path(args.config).resolve())
    try:
        settings = load_settings(args.config)
        return int(args.func(args, settings) or 0)
    except KtoLoopError as exc:
        print(f"ktoloop: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be read or written: the message names it
        if args.verbose:
            raise
        print(f"ktoloop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
