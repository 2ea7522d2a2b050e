"""The run skeleton every trainer shares (offline preference training, the reward model, PPO).

A run directory holds the trained weights, ``metrics.jsonl`` (one line per optimizer step), the run's
metadata file, and ``checkpoints/step-NNNNNN/state.pt`` while it trains. Each trainer adds its own fields to
the metadata (``run_meta``) and its own state to a checkpoint (``save_checkpoint(..., **state)``); what they
have in common is written here once.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ktoloop.errors import KtoLoopError

META_FILE, METRICS_FILE = "training_meta.json", "metrics.jsonl"
"""What a candidate's directory holds next to its adapter, whichever trainer wrote it (offline or PPO)."""
CHECKPOINTS = "checkpoints"


@dataclass
class RunResult:
    """A finished run: its directory and its metadata (``eval``: the held-out score, ``stop``: why PPO stopped)."""

    out_dir: Path
    meta: dict

    @property
    def eval(self) -> dict | None:
        return self.meta.get("eval")

    @property
    def stop(self) -> dict:
        return self.meta.get("stop") or {}


def finished_run(out_dir: Path, resume: bool, meta_file: str = META_FILE) -> dict | None:
    """The metadata of a run that already finished in ``out_dir`` (``resume`` reuses it), else None."""
    if not (out_dir / meta_file).is_file():
        return None
    if not resume:
        raise KtoLoopError(f"{out_dir} already holds a finished run; use --resume to reuse it or another --run-id")
    return json.loads((out_dir / meta_file).read_text())


def run_meta(config, snapshot, reference, started: float, **fields) -> dict:
    """The metadata block every run records: its config, what it trained on and from, its time, the versions."""
    from training.runtime import lib_versions

    return {
        "config": config.to_dict(),
        "config_fingerprint": config.fingerprint(),
        "adapter": "full" if getattr(config, "full_finetune", False) else "lora",
        "snapshot": {"id": snapshot.manifest.snapshot_id, "content_sha256": snapshot.manifest.content_sha256,
                     "model_version": snapshot.manifest.model_version, "kto_weights": snapshot.manifest.kto_weights},
        "reference": {"name": reference.name, "model_version": reference.model_version, "path": reference.path,
                      "sha256": reference.sha256},
        **fields,
        "seconds": round(time.time() - started, 2),
        "versions": {"torch": torch.__version__, **lib_versions()},
    }


def write_meta(out_dir: Path, meta: dict, meta_file: str = META_FILE) -> RunResult:
    (out_dir / meta_file).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return RunResult(out_dir, meta)


# --- metrics.jsonl ----------------------------------------------------------------------------------------

def append_metrics(out_dir: Path, metrics: dict) -> None:
    with (out_dir / METRICS_FILE).open("a") as fh:
        fh.write(json.dumps(metrics) + "\n")


def last_metrics(out_dir: Path) -> dict:
    """The last step's line of ``metrics.jsonl`` ({} before the first step)."""
    path = out_dir / METRICS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def truncate_metrics(out_dir: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint (they will be recomputed)."""
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in lines))


# --- checkpoints ------------------------------------------------------------------------------------------

def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model, config, *, rank: int = 0, **state) -> None:
    """Atomically write step ``step``'s checkpoint: the trainable weights, the RNG, the config's fingerprint and
    ``state`` (each value a ``state_dict()``-able object or plain data); keep the newest ``keep_checkpoints``."""
    if rank == 0:
        root = out_dir / CHECKPOINTS
        final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"step": step, "config": config.fingerprint(), "trainable": trainable_state(model),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    **{k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}},
                   tmp / "state.pt")
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[: -config.keep_checkpoints]:
            shutil.rmtree(old)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_checkpoint(out_dir: Path, model, config, section: str, **loadable) -> dict | None:
    """Restore the latest checkpoint into ``model`` (trainable weights), the RNG and each of ``loadable``
    (``load_state_dict``); return the saved dict for the caller's own state, or None when there is none.
    Refused: a checkpoint of another config, or of another set of trainable weights."""
    found = sorted((out_dir / CHECKPOINTS).glob("step-*"))
    if not found:
        return None
    saved = torch.load(found[-1] / "state.pt", weights_only=False)
    if saved["config"] != config.fingerprint():
        raise KtoLoopError(f"checkpoint {found[-1]} was written with another {section} config ({saved['config']} "
                           f"!= {config.fingerprint()}); resume with the same [{section}] settings")
    params = dict(model.named_parameters())
    mismatch = set(saved["trainable"]) ^ {n for n, p in params.items() if p.requires_grad}
    if mismatch:
        raise KtoLoopError(f"checkpoint {found[-1]} does not match this model/config (e.g. {sorted(mismatch)[0]}); "
                           f"start a fresh run instead of --resume")
    with torch.no_grad():
        for name, value in saved["trainable"].items():
            params[name].copy_(value)
    for key, target in loadable.items():
        target.load_state_dict(saved[key])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return saved
