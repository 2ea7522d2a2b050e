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


def test_data_dir_defaults_to_the_packaged_copy_and_names_a_missing_file(tmp_path, monkeypatch):
    from ktoloop import data

    monkeypatch.delenv("KTOLOOP_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./ktoloop.toml here; relative paths, like home, resolve against the CWD
    assert load_settings().data_path == data.packaged_dir()
    (tmp_path / "mine" / "feedback").mkdir(parents=True)
    (tmp_path / "mine" / "feedback" / "x.jsonl").write_text("{}\n")
    cfg = tmp_path / "k.toml"
    cfg.write_text('data_dir = "mine"\n')
    s = load_settings(cfg)
    assert s.data_path == tmp_path.resolve() / "mine"
    assert s.data_file("feedback/x.jsonl") == tmp_path.resolve() / "mine" / "feedback" / "x.jsonl"
    with pytest.raises(ConfigError, match=r"hh\.jsonl\.gz not found; set the top-level data_dir"):
        s.data_file("feedback/hh.jsonl.gz")
