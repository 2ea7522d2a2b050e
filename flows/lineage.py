"""Generations: which model serves, a promoted model as a servable pinned version, and the chain back to base.

The loop follows the serving model. Generation 0 is a pinned base model (``ktoloop reference ...``). Promoting a
candidate exports it as a standalone Hugging Face directory (LoRA merged into its reference) and pins it under
a new model version that names its lineage, ``<parent version>+g<generation>-<8 hex of the model id>``:
production stamps that string on the feedback of the model it serves, the next dataset is built from that
feedback only, and the next candidate is trained from that model, with it as the frozen reference.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from flows import registry
from ktoloop.config import Settings, load_section
from ktoloop.errors import KtoLoopError
from ktoloop.store import Store


def served_version(parent_version: str, generation: int, model_id: str) -> str:
    """The model_version production stamps on the feedback of a promoted model."""
    return f"{parent_version}+g{generation}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def base_reference(settings: Settings):
    """Generation 0: the one pinned base model, or the one ``[training] reference`` names among several."""
    from training.config import TrainConfig
    from training.reference import base_references, load_reference

    named = load_section(settings, "training", TrainConfig).reference
    if named:
        return load_reference(named, settings.home_dir)
    bases = base_references(settings.home_dir)
    if not bases:
        raise KtoLoopError(f"no pinned base model under {settings.home_dir / 'references'}; pin one with `ktoloop "
                           f"reference materialize-smollm2` or `ktoloop reference pin PATH --model-version V`")
    if len(bases) > 1:
        raise KtoLoopError(f"{len(bases)} pinned base models ({', '.join(b.name for b in bases)}); name the one "
                           f"generation 0 starts from as [training] reference")
    return bases[0]


def export_reference(settings: Settings, candidate: registry.Candidate):
    """The pinned reference a promoted candidate is served as (None until it is exported)."""
    from training.reference import list_references

    found = [r for r in list_references(settings.home_dir) if r.model_id == candidate.model_id]
    return found[0] if found else None


def serving_reference(settings: Settings, store: Store):
    """The model serving now, as a pinned reference: the promoted model's export, or the base model."""
    current = registry.promoted(store)
    if current is None:
        return base_reference(settings)
    pin = export_reference(settings, current)
    if pin is None:
        raise KtoLoopError(f"{current.model_id} serves but was never exported; run `ktoloop models promote "
                           f"{current.model_id} --force --reason re-export` or roll back")
    return pin


def resolve_model_version(settings: Settings, store: Store, requested: str | None) -> str:
    """The feedback a dataset is built from: the serving model's by default, else a pinned version's."""
    from training.reference import list_references

    if requested is None:
        return serving_reference(settings, store).model_version
    pinned = sorted({r.model_version for r in list_references(settings.home_dir)})
    if requested not in pinned:
        raise KtoLoopError(f"model version {requested!r} has no pinned reference (pinned: {pinned or 'none'}); "
                           "datasets are built only for the version of a pinned reference")
    return requested


def export_model(settings: Settings, candidate: registry.Candidate, out_dir: str | Path) -> Path:
    """A standalone HF model directory of ``candidate``: weights (LoRA merged into its reference), tokenizer
    with its chat template, generation config; ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    from training.modeling import load_model
    from training.reference import reference_for_snapshot

    reference = reference_for_snapshot(candidate.model_version, settings.home_dir, candidate.reference_name)
    base, adapter = model_dirs(reference.path, candidate)
    model, tokenizer = load_model(base, adapter, device="cpu")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def pin_export(settings: Settings, candidate: registry.Candidate):
    """Export ``candidate`` under ``<home>/references/<its version>/model`` and pin it with its lineage
    (idempotent: an existing, intact export is kept)."""
    from training.reference import pin_reference, reference_for_snapshot, references_dir

    existing = export_reference(settings, candidate)
    if existing is not None:
        existing.verify()
        return existing
    parent = reference_for_snapshot(candidate.model_version, settings.home_dir, candidate.reference_name)
    generation = parent.generation + 1
    version = served_version(parent.model_version, generation, candidate.model_id)
    out = export_model(settings, candidate, references_dir(settings.home_dir) / version / "model")
    return pin_reference(out, version, settings.home_dir, parent=parent.model_version, generation=generation,
                         model_id=candidate.model_id)


@dataclass(frozen=True)
class Link:
    """One generation of a model's lineage."""

    generation: int
    model_version: str
    model_id: str
    """'' for the base model."""
    gate: str
    """The verdict that promoted it (or the reason it was forced); '' for the base."""


def chain(settings: Settings, store: Store, model_id: str) -> list[Link]:
    """``model_id``'s lineage, newest first, back to the base model: each generation's version and gate line."""
    from training.reference import list_references

    pins = {r.model_version: r for r in list_references(settings.home_dir)}
    candidate = registry.get(store, model_id)
    export = export_reference(settings, candidate)
    parent = pins.get(candidate.model_version)
    links = [Link(parent.generation + 1 if parent else 1, export.model_version if export else "(not exported)",
                  model_id, (candidate.evaluation or {}).get("summary", candidate.status))]
    version, seen = candidate.model_version, set()
    while version in pins and version not in seen:
        seen.add(version)
        pin = pins[version]
        gate = ""
        if pin.model_id:
            found = registry.find(store, pin.model_id)
            gate = (found.evaluation or {}).get("summary", found.status) if found else "(not in this registry)"
        links.append(Link(pin.generation, pin.model_version, pin.model_id, gate))
        version = pin.parent
    return links


def model_dirs(reference_path: str, candidate: registry.Candidate | None) -> tuple[str, str | None]:
    """(base, adapter) for a candidate (None: the reference): LoRA adapters sit on the reference, full
    fine-tunes stand alone."""
    if candidate is None:
        return reference_path, None
    if candidate.config.get("full_finetune"):
        return candidate.adapter_path, None
    return reference_path, candidate.adapter_path
