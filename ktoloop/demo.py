"""``ktoloop demo`` (the README's ``make demo``): the whole loop on embedded defaults, with progress shown.

local broker -> publish real HH-RLHF feedback + a drifted synthetic window -> drain into DuckDB ->
pin SmolLM2-135M-Instruct -> build the snapshot and decide -> train a KTO LoRA adapter (bounded steps) ->
quick capability suite, reference vs candidate -> promotion gate -> Evidently drift report + workspace.
Running it twice reuses what the first run finished (same events, same snapshot id, same candidate).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

from ktoloop import data
from ktoloop.config import Settings

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "ktoloop.demo.toml"


def add_commands(sub) -> None:
    demo = sub.add_parser("demo", help="the whole loop on embedded defaults (what `make demo` runs)")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from ktoloop.config import load_settings

    config = Path(args.config or os.environ.get("KTOLOOP_CONFIG") or DEMO_CONFIG).resolve()
    os.environ["KTOLOOP_CONFIG"] = str(config)  # the Prefect flows load their settings from the same file
    run_demo(load_settings(config))
    return 0


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.step = 0

    def __call__(self, text: str) -> None:
        self.step += 1
        print(f"\n[{time.monotonic() - self.started:6.0f} s] {self.step}. {text}", flush=True)


def run_demo(settings: Settings, hh_file: Path | None = None, drifted_events: int = 5000) -> dict:
    """Run the loop once; ``settings`` must come from the file in $KTOLOOP_CONFIG (the flows reload it).

    ``hh_file`` defaults to the HH-RLHF file under ``data_dir``; a missing one fails here, before any work."""
    hh_file = hh_file or settings.data_file(data.HH_RLHF_HARMLESS_TEST)
    say = Progress()

    from ingest.broker import LocalBroker
    from ingest.hh_rlhf import convert
    from ingest.publish import publish
    from ingest.schema import encode_event
    from ingest.synthetic import synthetic_events
    from training.reference import DEFAULT_MODEL_VERSION, materialize_default

    say("reference: materialise SmolLM2-135M-Instruct (GGUF -> safetensors, once) and pin it by sha256")
    reference = materialize_default(settings.home_dir)
    print(f"   pinned {reference.name} ({reference.model_version}) sha256 {reference.sha256[:16]}... at {reference.path}")

    if settings.kafka.bootstrap_servers == f"{settings.broker.host}:{settings.broker.port}":
        say(f"broker: start the local Kafka-protocol broker (Tansu) on {settings.broker.host}:{settings.broker.port}")
        print(f"   {LocalBroker(settings.broker, settings.home_dir).start()}")

    say(f"publish: real HH-RLHF feedback ({hh_file.name}) + {drifted_events} synthetic events whose thumbs-up rate drifted")
    hh = [encode_event(e) for e in convert(hh_file, DEFAULT_MODEL_VERSION)]
    drift_start = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc)
    drifted = [encode_event(e) for e in synthetic_events(drifted_events, seed=42, up_rate=0.35, start=drift_start,
                                                          model_version=DEFAULT_MODEL_VERSION, id_prefix="demo-drift")]
    malformed = [b'{"event_id": "demo-bad-1", "prompt": "hi"}', b"not json at all"]
    print(f"   published {publish(settings.kafka, hh + drifted + malformed)} messages "
          f"({len(hh)} HH events at 50% up, {len(drifted)} synthetic at 35% up, {len(malformed)} malformed)")

    say("retrain flow (Prefect): drain -> build dataset -> decide -> train KTO LoRA -> evaluate -> promote")
    from flows.prefect_flows import monitor_flow, retrain_flow

    outcome = retrain_flow(reason="demo")

    say("monitor flow (Prefect): Evidently drift report between the HH window and the drifted window")
    drift = monitor_flow()

    from flows import registry
    from flows.lineage import serving_reference
    from flows.loop import store_of
    from monitoring.config import monitoring_dir

    store = store_of(settings)
    counts = store.read("SELECT (SELECT count(*) FROM feedback) AS feedback, "
                        "(SELECT count(*) FROM dead_letters) AS dead_letters").row(0, named=True)
    serving = registry.promoted(store)
    serving_version = serving_reference(settings, store).model_version
    say(f"done in {time.monotonic() - say.started:.0f} s")
    decision = outcome.get("decision", {})
    print(f"""
   feedback landed      {counts['feedback']} events ({counts['dead_letters']} quarantined in dead_letters)
   snapshot             {outcome.get('snapshot_id')}  -> decision: {decision.get('method')} ({'; '.join(decision.get('reasons', []))})
   candidate            {outcome.get('model_id')}
   gate                 {outcome['status'].upper()}: {outcome['reason']}
   serving now          {serving.model_id if serving else 'the base model'}
   model version        {serving_version}   (production stamps this on the served model's feedback)
   drift                {'DRIFT' if drift['drifted'] else 'no drift'}: {'; '.join(drift['reasons'][:3])}
   report               {drift['html']}
   DuckDB               {settings.db_path}
   models               {settings.home_dir / 'models'}
   workspace            {monitoring_dir(settings) / 'workspace'}

   next: ktoloop models list          ktoloop dataset show {outcome.get('snapshot_id')}
         ktoloop monitor ui           (Evidently dashboard on http://127.0.0.1:8000)
         ktoloop serve                (scheduled drain/monitor/retrain + drift trigger)
         KTOLOOP_CONFIG={os.environ.get('KTOLOOP_CONFIG', '')} ktoloop retrain --now
""")
    return {"outcome": outcome, "drift": drift}
