"""``ktoloop dataset ...`` (and, with the loop, ``models``, ``retrain``, ``serve``): thin handlers."""

from __future__ import annotations

import argparse
import datetime as dt

from ktoloop.config import Settings
from ktoloop.errors import KtoLoopError
from ktoloop.methods import METHODS


def add_commands(sub: argparse._SubParsersAction) -> None:
    dataset = sub.add_parser("dataset", help="build and inspect training snapshots")
    dataset_sub = dataset.add_subparsers(dest="action", required=True)
    build = dataset_sub.add_parser("build", help="build a snapshot from landed feedback and decide the method")
    build.add_argument("--model-version", help="default: the pinned reference's model version")
    build.add_argument("--since", type=_time, help="event_time lower bound (ISO 8601, inclusive)")
    build.add_argument("--until", type=_time, help="event_time upper bound (ISO 8601, exclusive)")
    build.add_argument("--method", choices=list(METHODS), help="force a method (must be eligible)")
    build.add_argument("--holdout", type=float, help="share of prompts held out (default from [dataset])")
    build.set_defaults(func=_build)
    show = dataset_sub.add_parser("show", help="counts, balance, noise and this config's decision about a snapshot")
    show.add_argument("snapshot_id", help="id from `ktoloop dataset list`, or a snapshot directory")
    show.set_defaults(func=_show)
    dataset_sub.add_parser("list", help="snapshots recorded in DuckDB").set_defaults(func=_list)
    add_loop_commands(sub)


def _time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _build(args: argparse.Namespace, settings: Settings) -> int:
    from flows.loop import build

    result = build(settings, model_version=args.model_version, method=args.method, since=args.since,
                   until=args.until, holdout=args.holdout)
    print(f"snapshot {result.snapshot.manifest.snapshot_id} ({'reused' if result.reused else 'built'} in "
          f"{result.seconds:.1f} s) at {result.snapshot.path}")
    _print_summary(result.snapshot.manifest, result.decision)
    return 0


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from flows.loop import decide
    from ktoloop.snapshot import load_snapshot

    snapshot = load_snapshot(args.snapshot_id, settings.home_dir)
    _print_summary(snapshot.manifest, decide(settings, snapshot.manifest.snapshot_id, record=False))
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from flows.dataset import list_datasets
    from ktoloop.cli import existing_store
    from ktoloop.tables import print_frame

    store = existing_store(settings)
    if store is not None:
        print_frame(list_datasets(store), empty="no snapshots yet; build one with `ktoloop dataset build`")
    return 0


def _print_summary(m, d) -> None:
    """A snapshot's counts and weights, and the decision about it under this config (``d``)."""
    c = m.counts
    up, down = c["kto_train_desirable"], c["kto_train_undesirable"]
    print(f"model version {m.model_version}; content sha256 {m.content_sha256}")
    print(f"events in window {c['events_in_window']}, other model versions excluded {c['excluded_other_versions']}, "
          f"duplicates collapsed {c['duplicates_collapsed']}")
    print(f"answers {c['answers']}, conflicts (label noise) {c['conflicts']} = {d.noise_rate:.2%}")
    print(f"KTO train: {up} up / {down} down (balance {up / max(1, up + down):.1%} up); "
          f"eval: {c['kto_eval_desirable']} up / {c['kto_eval_undesirable']} down; "
          f"prompts {c['prompts']} ({c['prompts_eval']} held out)")
    print(f"same-prompt pairs: train {c['pairs_train']}, eval {c['pairs_eval']} from {c['prompts_with_pairs']} prompts")
    w = m.kto_weights
    print(f"KTO weights: lambda_D {w['desirable']:.3f}, lambda_U {w['undesirable']:.3f} "
          f"(lambda_D*n_D / lambda_U*n_U = {w['ratio']:.3f})")
    verdict = f"train with {d.method.upper()}" if d.train else "NO TRAINING"
    print(f"decision: {verdict} (rule settings {d.key})")
    for line in d.reasons:
        print(f"  - {line}")
    for line in d.warnings:
        print(f"  ! {line}")
    for method, e in sorted(d.eligibility.items()):
        print(f"  {method}: {'eligible' if e['eligible'] else 'not eligible: ' + e['reason']}")



def add_loop_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model registry: candidates, the promoted pointer, its history")
    models_sub = models.add_subparsers(dest="action", required=True)
    models_sub.add_parser("list", help="candidates, newest first, and what serves now").set_defaults(func=_models_list)
    show = models_sub.add_parser("show", help="lineage, metrics and gate numbers of one model")
    show.add_argument("model_id", help="id from `ktoloop models list`")
    show.set_defaults(func=_models_show)
    promote = models_sub.add_parser("promote", help="promote a model (a failed gate needs --force and --reason)")
    promote.add_argument("model_id", help="id from `ktoloop models list`")
    promote.add_argument("--force", action="store_true", help="override a failed or missing gate")
    promote.add_argument("--reason", default="", help="why (recorded with who did it)")
    promote.set_defaults(func=_models_promote)
    export = models_sub.add_parser("export", help="write a registered model as a standalone HF model directory")
    export.add_argument("model_id", help="a model id from `ktoloop models list`")
    export.add_argument("dir", help="output directory (LoRA merged into its reference; tokenizer, chat template)")
    export.set_defaults(func=_models_export)
    canary = models_sub.add_parser("canary", help="decide the pending canary on its live feedback now (the retrain "
                                                  "flow does this first)")
    canary.set_defaults(func=_models_canary)
    rollback = models_sub.add_parser("rollback", help="serve the previously promoted model again")
    rollback.add_argument("--reason", default="manual rollback", help="why (recorded with the rollback)")
    rollback.set_defaults(func=_models_rollback)

    retrain = sub.add_parser("retrain", help="drain -> build -> decide -> train -> evaluate -> promote")
    retrain.add_argument("--now", action="store_true", required=True, help="run the retrain flow in-process now")
    retrain.add_argument("--method", choices=list(METHODS), help="force a method (must be eligible)")
    retrain.add_argument("--reason", default="manual", help="recorded as the run's trigger")
    retrain.set_defaults(func=_retrain)

    serve = sub.add_parser("serve", help="serve the scheduled deployments and the drift trigger (Prefect)")
    serve.add_argument("--api-port", type=int, default=4200, help="port of the local Prefect server, if one is started")
    serve.set_defaults(func=_serve)


def _models_list(args: argparse.Namespace, settings: Settings) -> int:
    from flows import registry
    from ktoloop.cli import existing_store
    from ktoloop.tables import print_frame

    from flows.lineage import serving_reference
    from training.reference import list_names

    store = existing_store(settings)
    current = registry.promoted(store) if store is not None else None
    if store is not None:
        print_frame(registry.list_models(store), empty="no models yet; train one with `ktoloop retrain --now`")
    print(f"serving: {current.model_id if current else 'the base model (nothing promoted)'}")
    if store is not None and list_names(settings.home_dir):
        serving = serving_reference(settings, store)
        print(f"production stamps model_version = {serving.model_version!r} (generation {serving.generation}) "
              f"on the served model's feedback")
    canary = registry.canary(store) if store is not None else None
    if canary is not None:
        info = canary.evaluation["canary"]
        print(f"canary: {canary.model_id} since {info['since']}; production stamps model_version = "
              f"{info['model_version']!r} on the feedback of the share of traffic it serves")
    return 0


def _models_show(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses
    import json

    from flows import registry
    from flows.lineage import chain
    from flows.loop import store_of

    store = store_of(settings)
    print(json.dumps(dataclasses.asdict(registry.get(store, args.model_id)), indent=2, default=str))
    print("lineage (newest first):")
    for link in chain(settings, store, args.model_id):
        print(f"  generation {link.generation}: {link.model_version}  {link.model_id or '(base model)'}"
              + (f"\n      {link.gate}" if link.gate else ""))
    return 0


def _models_export(args: argparse.Namespace, settings: Settings) -> int:
    from flows import registry
    from flows.lineage import export_model
    from flows.loop import store_of

    out = export_model(settings, registry.get(store_of(settings), args.model_id), args.dir)
    print(f"exported {args.model_id} to {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _models_promote(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from flows import registry
    from flows.loop import evaluate_candidate, promote, promote_if_passing, store_of

    store = store_of(settings)
    if args.force:  # recorded with who forced it and why; the stored verdict, if any, goes with it
        pin = promote(settings, args.model_id, gate=registry.get(store, args.model_id).evaluation, forced=True,
                      reason=args.reason, actor=getpass.getuser())
        print(f"promoted {args.model_id} (forced); it serves as model version {pin.model_version}")
        return 0
    gate = evaluate_candidate(settings, args.model_id)  # against the model serving now, like the retrain flow
    print(gate.summary)
    status = promote_if_passing(settings, args.model_id, gate, actor=getpass.getuser())
    if status == "rejected":
        raise KtoLoopError(f"{args.model_id} did not pass the promotion gate; use --force with --reason to override")
    from flows.lineage import serving_reference

    if status == "canary":
        version = registry.get(store, args.model_id).evaluation["canary"]["model_version"]
        print(f"{args.model_id} is a canary: route a share of traffic to it and stamp model_version {version!r} on "
              f"that share's feedback; `ktoloop models canary` (or the next retrain) decides it")
        return 0
    print(f"serving {args.model_id} as model version {serving_reference(settings, store).model_version}")
    return 0


def _models_canary(args: argparse.Namespace, settings: Settings) -> int:
    from flows.loop import check_canary, drain

    drain(settings)  # like the retrain flow: decide on everything rated so far
    verdict = check_canary(settings)
    print(verdict.reason if verdict else "no canary pending")
    return 0


def _models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from flows import registry
    from flows.loop import store_of

    from flows.lineage import serving_reference

    store = store_of(settings)
    target = registry.rollback(store, reason=args.reason)
    print(f"serving: {target or 'the base model'} (model version {serving_reference(settings, store).model_version})")
    return 0


def _retrain(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from flows.prefect_flows import run_retrain_now

    outcome = run_retrain_now(reason=args.reason, method=args.method)
    print(json.dumps(outcome, indent=2, default=str))
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from flows.serving import serve_deployments

    serve_deployments(settings, api_port=args.api_port)
    return 0
