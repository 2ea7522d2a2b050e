import pytest

from ktoloop.config import ConfigError, KafkaConfig, load_settings


def test_unknown_key_rejected_by_name(tmp_path, monkeypatch):
    cfg = tmp_path / "k.toml"
    cfg.write_text('[kafka]\nbootstrap_server = "x:1"\n')
    with pytest.raises(ConfigError, match=r"bootstrap_server.*\[kafka\]"):
        load_settings(cfg)


def test_wrong_type_named(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text('[ingest]\nbatch_max_events = "many"\n')
    with pytest.raises(ConfigError, match="ingest.batch_max_events"):
        load_settings(cfg)


def test_file_values_and_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "k.toml"
    cfg.write_text('home = "/tmp/h"\n[kafka]\ntopic = "fb"\nclient = { security_protocol = "SASL_SSL" }\n')
    monkeypatch.setenv("KTOLOOP_BOOTSTRAP", "kafka:9093")
    s = load_settings(cfg)
    assert s.kafka.topic == "fb" and s.kafka.bootstrap_servers == "kafka:9093"
    assert s.kafka.client == {"security_protocol": "SASL_SSL"}
    assert str(s.db_path) == "/tmp/h/ktoloop.duckdb"


def test_validation_at_construction():
    with pytest.raises(ConfigError, match="heartbeat"):
        KafkaConfig(session_timeout_ms=3000, heartbeat_interval_ms=2000)


def test_ingest_dead_letter_and_drain_limits_are_validated(tmp_path):
    from ktoloop.config import IngestConfig

    assert (IngestConfig().dead_letter_max_bytes, IngestConfig().drain_join_timeout_s) == (65_536, 60.0)
    with pytest.raises(ConfigError, match="ingest.dead_letter_max_bytes must be >= 0, got -1"):
        IngestConfig(dead_letter_max_bytes=-1)
    with pytest.raises(ConfigError, match="ingest.drain_join_timeout_s must be > 0, got 0"):
        IngestConfig(drain_join_timeout_s=0)
    cfg = tmp_path / "k.toml"
    cfg.write_text("[ingest]\ndead_letter_max_bytes = 0\ndrain_join_timeout_s = 5\n")
    assert load_settings(cfg).ingest.dead_letter_max_bytes == 0
