from pathlib import Path

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


def test_every_section_is_validated_when_the_file_is_loaded_naming_file_section_and_field(tmp_path):
    cfg = tmp_path / "k.toml"
    for text, field in (("[training]\nlr = -1\n", "training.lr must be > 0"),
                        ('[flows]\nsuite = "huge"\n', "flows.suite must be quick or full"),
                        ("[ppo]\nlearning_rate = 1\n", "unknown key(s) ['learning_rate'] in [ppo]"),
                        ("[dataset.gates]\nmax_noise_rate = 2\n", "dataset.gates.max_noise_rate"),
                        ("[monitoring]\nwindow_days = 0\n", "monitoring.window_days"),
                        ("[reward]\nepochs = 0\nmax_steps = 0\n", "reward.epochs and reward.max_steps")):
        cfg.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(cfg)
        assert str(caught.value).startswith(f"{cfg}: ") and field in str(caught.value)


def test_load_section_returns_the_instance_validated_at_load(tmp_path):
    from ktoloop.config import SECTIONS, Settings, load_section, section_class

    cfg = tmp_path / "k.toml"
    cfg.write_text("[training]\nbeta = 0.3\n")
    settings = load_settings(cfg)
    assert load_section(settings, "training").beta == 0.3
    assert all(isinstance(settings.sections[n], section_class(n)) for n in SECTIONS)
    assert load_section(Settings(), "flows").suite == "quick"  # built directly: from the (empty) raw file


def test_section_modules_validate_without_torch_duckdb_or_prefect():
    import subprocess
    import sys

    code = ("import sys; from ktoloop.config import SECTIONS, section_class; [section_class(n) for n in SECTIONS]; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'duckdb', 'pyarrow', 'polars', "
            "'prefect', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]", result.stdout


def test_paths_in_the_file_resolve_against_its_folder_and_env_home_against_the_working_directory(tmp_path,
                                                                                                  monkeypatch):
    (tmp_path / "proj").mkdir()
    cfg = tmp_path / "proj" / "k.toml"
    cfg.write_text('home = "state"\ndata_dir = "~/inputs"\n[store]\npath = "db/x.duckdb"\n'
                   '[monitoring]\nbenchmarks_dir = "bench"\n')
    monkeypatch.delenv("KTOLOOP_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    s = load_settings(cfg)
    assert s.home_dir == tmp_path / "proj" / "state"
    assert s.data_path == Path("~/inputs").expanduser()
    assert s.db_path == tmp_path / "proj" / "db" / "x.duckdb"
    assert s.sections["monitoring"].benchmarks_path == tmp_path / "proj" / "bench"
    monkeypatch.setenv("KTOLOOP_HOME", "elsewhere")
    assert load_settings(cfg).home_dir == tmp_path / "elsewhere"


def test_the_bootstrap_address_follows_the_local_broker_unless_set(tmp_path, monkeypatch):
    monkeypatch.delenv("KTOLOOP_BOOTSTRAP", raising=False)
    cfg = tmp_path / "k.toml"
    cfg.write_text("[broker]\nport = 19093\n")
    assert load_settings(cfg).kafka.bootstrap_servers == "127.0.0.1:19093"
    cfg.write_text('[broker]\nport = 19093\n[kafka]\nbootstrap_servers = "kafka:9092"\n')
    assert load_settings(cfg).kafka.bootstrap_servers == "kafka:9092"
    monkeypatch.setenv("KTOLOOP_BOOTSTRAP", "other:9092")
    assert load_settings(cfg).kafka.bootstrap_servers == "other:9092"


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
    monkeypatch.chdir(tmp_path)  # no ./ktoloop.toml here: without a file, relative paths resolve against the CWD
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
