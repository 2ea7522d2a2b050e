"""``ktoloop reference ...``, ``ktoloop train``, ``ktoloop reward ...`` and ``ktoloop ppo``: thin handlers over
training.reference / trainer / reward / ppo.

Locations: pins under ``<home>/references/<name>/``, reward models under ``<home>/reward_models/<name>/``
(``model/`` + ``reward_model.json``), runs (PPO included) under ``<home>/models/<run_id>/``, the reference
log-prob cache under ``<home>/cache/``. torch is imported inside handlers so ``ktoloop --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from ktoloop.config import ConfigError, Settings, load_section
from ktoloop.methods import OFFLINE
from training.config import TrainConfig

log = logging.getLogger(__name__)


def add_commands(subparsers) -> None:
    ref = subparsers.add_parser("reference", help="pin and inspect reference models")
    ref_sub = ref.add_subparsers(dest="reference_command", metavar="ACTION", required=True)
    pin = ref_sub.add_parser("pin", help="hash a model directory and pin it as a reference")
    pin.add_argument("path", help="HF model directory (config.json, weights, tokenizer)")
    pin.add_argument("--model-version", required=True, help="the model version that served the responses")
    pin.add_argument("--name", default="", help="pin name (default: the model version)")
    pin.set_defaults(func=cmd_pin)
    mat = ref_sub.add_parser("materialize-smollm2", help="de-quantise SmolLM2-135M-Instruct (GGUF) and pin it")
    mat.add_argument("--out", default=None, help="model directory (default: <home>/references/<version>/model)")
    mat.add_argument("--model-version", default=None, help="default: smollm2-135m-instruct-q4_1")
    mat.set_defaults(func=cmd_materialize)
    show = ref_sub.add_parser("show", help="list pinned references")
    show.add_argument("--verify", action="store_true", help="re-hash every file")
    show.set_defaults(func=cmd_show)

    train = subparsers.add_parser("train", help="train a KTO/DPO/IPO adapter on a dataset snapshot")
    train.add_argument("--snapshot", required=True, help="snapshot id (under <home>/snapshots) or directory")
    train.add_argument("--method", choices=OFFLINE, help="loss (default: [training] method)")
    train.add_argument("--beta", type=float, help="pull towards the reference (default: [training] beta)")
    train.add_argument("--sweep-beta", default="", help="comma-separated betas, e.g. 0.05,0.1,0.3; keeps the best")
    _section_flags(train, "training", (("--lr", float, "learning rate"), ("--epochs", int, "passes over the data"),
                                       ("--max-steps", int, "optimizer steps; 0 = --epochs passes"),
                                       ("--batch-size", int, "examples per forward"),
                                       ("--grad-accumulation-steps", int, "forwards per optimizer step")))
    train.add_argument("--full-finetune", action="store_true", default=None,
                       help="train every weight instead of a LoRA adapter")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: [training] device (auto = CUDA "
                       "when available)")
    train.add_argument("--reference", help="pinned reference name (default: the snapshot's model version)")
    train.add_argument("--run-id", default="", help="default: <method>-<snapshot>-<config hash>")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    add_override_flags(train)
    train.set_defaults(func=cmd_train)

    reward = subparsers.add_parser("reward", help="train and list reward models (for PPO)")
    reward_sub = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    rtrain = reward_sub.add_parser("train", help="train a reward model on a snapshot and pin it")
    rtrain.add_argument("--snapshot", required=True, help="snapshot id (under <home>/snapshots) or directory")
    _section_flags(rtrain, "reward", (("--lr", float, "learning rate"), ("--epochs", int, "passes over the data"),
                                      ("--max-steps", int, "optimizer steps; 0 = --epochs passes"),
                                      ("--batch-size", int, "pairs and unpaired thumbs per step (each)")))
    rtrain.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: [reward] device")
    rtrain.add_argument("--reference", help="pinned reference name (default: the snapshot's model version)")
    rtrain.add_argument("--run-id", default="", help="pin name (default: rm-<snapshot>-<config hash>)")
    rtrain.set_defaults(func=cmd_reward_train)
    rshow = reward_sub.add_parser("show", help="list pinned reward models")
    rshow.add_argument("--verify", action="store_true", help="re-hash every file")
    rshow.set_defaults(func=cmd_reward_show)

    ppo = subparsers.add_parser("ppo", help="PPO against a pinned reward model, within a compute budget")
    ppo.add_argument("--snapshot", required=True, help="snapshot id (under <home>/snapshots) or directory")
    ppo.add_argument("--reward-model", help="pinned reward model (default: the newest for the reference)")
    _section_flags(ppo, "ppo", (("--max-generated-tokens", int, "budget: generated tokens over the whole run"),
                                ("--max-seconds", float, "budget: wall seconds of the PPO loop"),
                                ("--max-steps", int, "PPO steps; 0 = until the budget is spent"),
                                ("--rollout-batch-size", int, "prompts generated per step"),
                                ("--mini-batch-size", int, "rollouts per update"),
                                ("--max-new-tokens", int, "tokens generated per prompt"),
                                ("--lr", float, "learning rate"), ("--kl-coef", float, "per-token KL penalty"),
                                ("--kl-bound", float, "stop when a rollout's mean KL (nats) exceeds this")))
    ppo.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: [ppo] device")
    ppo.add_argument("--reference", help="pinned reference name (default: the snapshot's model version)")
    ppo.add_argument("--run-id", default="", help="default: ppo-<snapshot>-<config hash>")
    ppo.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    add_override_flags(ppo)
    ppo.set_defaults(func=cmd_ppo)


def _section_flags(parser: argparse.ArgumentParser, section: str, flags: tuple[tuple[str, type, str], ...]) -> None:
    """Flags that override one key of ``[section]`` each; the help names the key they override."""
    for flag, kind, text in flags:
        key = flag.removeprefix("--").replace("-", "_")
        parser.add_argument(flag, type=kind, help=f"{text} (default: [{section}] {key})")


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="train although the snapshot's decision refuses it (needs --reason)")
    parser.add_argument("--reason", default="", help="why the decision is overridden; recorded with the run")


def override_reason(args: argparse.Namespace) -> str | None:
    """The recorded reason of ``--force --reason``; None when not forced."""
    if not args.force:
        return None
    if not args.reason.strip():
        raise ConfigError("--force needs --reason TEXT: an override of the decision is recorded with its reason")
    return args.reason.strip()


def cmd_pin(args: argparse.Namespace, settings: Settings) -> int:
    from training.reference import pin_reference

    ref = pin_reference(args.path, args.model_version, settings.home_dir, name=args.name)
    print(f"pinned {ref.name}: {ref.model_version} at {ref.path} ({len(ref.files)} files, sha256 {ref.sha256[:16]})")
    return 0


def cmd_materialize(args: argparse.Namespace, settings: Settings) -> int:
    from training.reference import DEFAULT_MODEL_VERSION, materialize_default

    ref = materialize_default(settings.home_dir, args.model_version or DEFAULT_MODEL_VERSION, args.out)
    print(f"pinned {ref.name}: {ref.model_version} at {ref.path} (sha256 {ref.sha256[:16]})")
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from training.reference import list_references

    return _show_pins(list_references(settings.home_dir), settings.home_dir / "references", args.verify,
                      ["name", "model_version", "sha256", "path"],
                      lambda r: [r.name, r.model_version, r.sha256[:16], r.path])


def _show_pins(pins: list, where, verify: bool, columns: list[str], row) -> int:
    """A table of pinned references or reward models; ``verify`` re-hashes each first (raises on a mismatch)."""
    from ktoloop.tables import format_table

    if not pins:
        print(f"nothing pinned under {where}")
        return 0
    for pin in pins:
        if verify:
            pin.verify()  # raises, naming the file, on the first mismatch
    print(format_table(columns + (["verified"] if verify else []),
                       [row(p) + (["yes"] if verify else []) for p in pins]))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """The loop's own train step (``flows.loop.train_candidate``: decision, reference, registry) with the
    flags on top of ``[training]``; ``--sweep-beta`` trains one run per beta and keeps the best."""
    from flows.loop import train_candidate

    config = train_config(args, settings)
    betas = parse_betas(args.sweep_beta)
    if betas:
        return _sweep(args, settings, config, betas)
    candidate = train_candidate(settings, args.snapshot, config.method, config=config, model_id=args.run_id or None,
                                override=override_reason(args), resume=args.resume)
    print(json.dumps({"model_id": candidate.model_id, "out_dir": candidate.adapter_path, "status": candidate.status,
                      "eval": candidate.metrics}, indent=2))
    return 0


def _sweep(args: argparse.Namespace, settings: Settings, config: TrainConfig, betas: list[float]) -> int:
    from flows.loop import decide
    from ktoloop.snapshot import load_snapshot
    from training.reference import reference_for_snapshot
    from training.trainer import train_sweep

    snapshot = load_snapshot(args.snapshot, settings.home_dir)
    reference = reference_for_snapshot(snapshot.manifest.model_version, settings.home_dir, config.reference)
    run_id = args.run_id or f"{config.method}-{snapshot.manifest.snapshot_id}-{config.fingerprint()}-sweep{len(betas)}"
    out_dir = settings.home_dir / "models" / run_id
    log.info("sweeping beta %s for %s on snapshot %s -> %s", betas, config.method, snapshot.manifest.snapshot_id,
             out_dir)
    result = train_sweep(config, snapshot, reference, out_dir, betas, decision=decide(settings, args.snapshot),
                         cache_dir=settings.home_dir / "cache", resume=args.resume, override=override_reason(args))
    print(json.dumps({"run_id": run_id, "out_dir": str(result.out_dir), "eval": result.eval,
                      "best_beta": result.meta.get("best_beta")}, indent=2))
    return 0


def train_config(args: argparse.Namespace, settings: Settings) -> TrainConfig:
    """``[training]`` from the TOML file, overridden by the flags given on the command line."""
    config = load_section(settings, "training", TrainConfig)
    overrides = {name: getattr(args, name) for name in ("method", "beta", "lr", "epochs", "max_steps", "batch_size",
                                                        "grad_accumulation_steps", "full_finetune", "device",
                                                        "reference") if getattr(args, name, None) is not None}
    return dataclasses.replace(config, **overrides)


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(b) for b in text.split(",") if b.strip()]
    except ValueError as exc:
        raise ConfigError(f"--sweep-beta must be comma-separated numbers, got {text!r}") from exc
    if any(b <= 0 for b in betas):
        raise ConfigError(f"--sweep-beta values must be > 0, got {text!r}")
    return betas


def cmd_reward_train(args: argparse.Namespace, settings: Settings) -> int:
    from ktoloop.snapshot import load_snapshot
    from training.reference import reference_for_snapshot
    from training.reward import RewardConfig, pin_reward_model, reward_models_dir, train_reward

    config = _overridden(load_section(settings, "reward", RewardConfig), args,
                         ("lr", "epochs", "max_steps", "batch_size", "device", "reference"))
    snapshot = load_snapshot(args.snapshot, settings.home_dir)
    reference = reference_for_snapshot(snapshot.manifest.model_version, settings.home_dir, config.reference)
    name = args.run_id or f"rm-{snapshot.manifest.snapshot_id}-{config.fingerprint()}"
    out_dir = reward_models_dir(settings.home_dir) / name / "model"
    log.info("training reward model %s on snapshot %s against %s", name, snapshot.manifest.snapshot_id, reference.name)
    result = train_reward(config, snapshot, reference, out_dir)
    info = pin_reward_model(out_dir, settings.home_dir, name)
    print(json.dumps({"reward_model": info.name, "out_dir": str(out_dir), "sha256": info.sha256,
                      "eval": result.eval}, indent=2))
    return 0


def cmd_reward_show(args: argparse.Namespace, settings: Settings) -> int:
    from training.reward import list_reward_models

    return _show_pins(list_reward_models(settings.home_dir), settings.home_dir / "reward_models", args.verify,
                      ["name", "reference", "reference_sha256", "snapshot", "accuracy"],
                      lambda i: [i.name, i.reference["name"], i.reference_sha256[:12], i.snapshot["id"],
                                 (i.eval or {}).get("accuracy")])


def cmd_ppo(args: argparse.Namespace, settings: Settings) -> int:
    """The loop's train step for PPO (``flows.loop.train_candidate``): ``[ppo]`` within the gates' token
    budget, then the flags; the reward model pinned for the reference unless ``--reward-model`` names one."""
    from flows.loop import train_candidate, trainer_for
    from training.runs import META_FILE

    config = _overridden(trainer_for("ppo").config(settings, "ppo"), args,
                         ("max_generated_tokens", "max_seconds", "max_steps", "rollout_batch_size", "mini_batch_size",
                          "max_new_tokens", "lr", "kl_coef", "kl_bound", "device", "reference", "reward_model"))
    candidate = train_candidate(settings, args.snapshot, "ppo", config=config, model_id=args.run_id or None,
                                override=override_reason(args), resume=args.resume)
    meta = json.loads((Path(candidate.adapter_path) / META_FILE).read_text())
    print(json.dumps({"model_id": candidate.model_id, "out_dir": candidate.adapter_path, "status": candidate.status,
                      "stop": meta.get("stop"), "rollouts": meta.get("rollouts"), "eval": candidate.metrics},
                     indent=2))
    return 0


def _overridden(config, args: argparse.Namespace, names: tuple[str, ...]):
    """The TOML section, overridden by the flags given on the command line (re-validated)."""
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return dataclasses.replace(config, **overrides)
