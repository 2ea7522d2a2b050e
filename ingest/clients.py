"""kafka-python clients built from ``KafkaConfig``: one place for timeouts, security pass-through and the
"broker unreachable" error, so the consumer, the publisher and the flows fail the same clear way."""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from ktoloop.config import KafkaConfig
from ktoloop.errors import TransientError


class BrokerUnavailable(TransientError):
    pass


def _common(config: KafkaConfig) -> dict[str, Any]:
    timeout_ms = int(config.connect_timeout_s * 1000)
    return {
        "bootstrap_servers": config.bootstrap_servers.split(","),
        "bootstrap_timeout_ms": timeout_ms,
        "request_timeout_ms": max(timeout_ms, 30_000),
        **config.client,  # security_protocol, sasl_*, ssl_* ... straight to kafka-python
    }


def _unavailable(config: KafkaConfig, exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"no Kafka broker reachable at {config.bootstrap_servers} within {config.connect_timeout_s:.0f} s "
        f"({type(exc).__name__}); start one with `ktoloop broker start` or set kafka.bootstrap_servers"
    )


def consumer(config: KafkaConfig, **overrides: Any) -> KafkaConsumer:
    settings = {
        **_common(config),
        "group_id": config.group_id,
        "enable_auto_commit": False,  # DuckDB holds the truth; Kafka commits are for lag monitoring only
        "auto_offset_reset": "earliest",
        "session_timeout_ms": config.session_timeout_ms,
        "heartbeat_interval_ms": config.heartbeat_interval_ms,
        "max_poll_interval_ms": config.max_poll_interval_ms,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "max_partition_fetch_bytes": 16 * 1024 * 1024,
        **overrides,
    }
    try:
        return KafkaConsumer(**settings)
    except KafkaTimeoutError as exc:
        raise _unavailable(config, exc) from exc


def producer(config: KafkaConfig, **overrides: Any) -> KafkaProducer:
    settings = {**_common(config), "linger_ms": 20, "batch_size": 512 * 1024, "acks": "all", **overrides}
    try:
        return KafkaProducer(**settings)
    except KafkaTimeoutError as exc:
        raise _unavailable(config, exc) from exc


def ensure_topic(config: KafkaConfig) -> None:
    """Create the feedback topic with ``config.partitions`` partitions if it does not exist yet."""
    try:
        admin = KafkaAdminClient(**_common(config))
    except KafkaTimeoutError as exc:
        raise _unavailable(config, exc) from exc
    try:
        if config.topic not in admin.list_topics():
            admin.create_topics([NewTopic(config.topic, config.partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    except KafkaError as exc:
        raise BrokerUnavailable(f"could not create topic {config.topic!r} on {config.bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()
