"""``ktoloop broker ...`` and ``ktoloop ingest ...``: thin handlers over the ingest modules."""

from __future__ import annotations

import argparse
import json
import sys

from ktoloop.config import Settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    broker = sub.add_parser("broker", help="the embedded local Kafka-protocol broker (Tansu)")
    broker_sub = broker.add_subparsers(dest="action", required=True)
    for action, text in (("start", "start it and wait until it accepts connections"),
                         ("stop", "stop it"), ("status", "say whether it runs")):
        broker_sub.add_parser(action, help=text).set_defaults(func=_broker)

    ingest = sub.add_parser("ingest", help="land feedback events from Kafka into DuckDB")
    ingest_sub = ingest.add_subparsers(dest="action", required=True)
    ingest_sub.add_parser("run", help="consume until SIGTERM/SIGINT (finishes the batch, commits, exits 0)"
                          ).set_defaults(func=_run)
    ingest_sub.add_parser("drain", help="consume until the group's lag is 0, then exit").set_defaults(func=_drain)
    publish = ingest_sub.add_parser("publish", help="publish a JSONL(.gz) or Parquet file of events to the topic")
    publish.add_argument("file", help="events, one JSON object per line (.jsonl, .jsonl.gz) or Parquet rows")
    publish.set_defaults(func=_publish)
    convert = ingest_sub.add_parser("convert-hh", help="convert HH-RLHF pairs into feedback events (JSONL)")
    convert.add_argument("file", help="e.g. ktoloop/data/feedback/hh_rlhf_harmless_base_test.jsonl.gz "
                         "(the copy shipped with the package)")
    convert.add_argument("--model-version", default="smollm2-135m-instruct-q4_1",
                         help="the model version the feedback is attributed to")
    convert.add_argument("--out", help="output JSONL (default: stdout)")
    convert.set_defaults(func=_convert)
    stats = ingest_sub.add_parser("stats", help="counts in the DuckDB store and the commonest dead-letter reasons")
    stats.add_argument("--reasons", action="store_true",
                       help="every distinct dead-letter reason, in full (default: the top 10, shortened)")
    stats.set_defaults(func=_stats)


def _broker(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.broker import LocalBroker

    broker = LocalBroker(settings.broker, settings.home_dir)
    if args.action == "start":
        print(broker.start())
    elif args.action == "stop":
        print("stopped" if broker.stop() else "broker was not running")
    else:
        status = broker.status()
        print(status)
        return 0 if status.running else 1
    return 0


def _ingestor(settings: Settings):
    from ingest.consumer import FeedbackIngestor

    ingestor = FeedbackIngestor(settings)
    ingestor.install_signal_handlers()
    return ingestor


def _run(args: argparse.Namespace, settings: Settings) -> int:
    print(_ingestor(settings).run())
    return 0


def _drain(args: argparse.Namespace, settings: Settings) -> int:
    print(_ingestor(settings).drain())
    return 0


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.publish import publish, read_messages

    sent = publish(settings.kafka, read_messages(args.file))
    print(f"published {sent} messages from {args.file} to topic {settings.kafka.topic!r}")
    return 0


def _convert(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.hh_rlhf import convert

    out = open(args.out, "w") if args.out else sys.stdout
    count = 0
    try:
        for event in convert(args.file, args.model_version):
            out.write(json.dumps(event) + "\n")
            count += 1
    finally:
        if args.out:
            out.close()
    print(f"wrote {count} events", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    from ktoloop.cli import existing_store
    from ktoloop.tables import print_frame

    store = existing_store(settings)
    if store is None:
        return 0
    print_frame(store.read(
        "SELECT (SELECT count(*) FROM feedback) AS feedback, (SELECT count(*) FROM dead_letters) AS dead_letters, "
        "(SELECT count(DISTINCT model_version) FROM feedback) AS model_versions, "
        "(SELECT max(ingested_at) FROM feedback) AS last_ingested_at"))
    reasons = store.read("SELECT count(*) AS n, error AS reason FROM dead_letters GROUP BY error ORDER BY 1 DESC, 2"
                         + ("" if args.reasons else " LIMIT 10"))
    print()
    print_frame(reasons, max_width=None if args.reasons else {"reason": 100}, empty="no dead letters")
    if not args.reasons and (reasons.height == 10 or any(len(r) > 100 for r in reasons["reason"])):
        print("(shortened: `ktoloop ingest stats --reasons` lists every reason in full)")
    return 0
