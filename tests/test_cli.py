"""What a new user meets at the ``ktoloop`` prompt: one-line errors naming the field, file or address (exit 2),
config checked whole before any work, paths relative to the config file, tables that never wrap an id, help."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ktoloop.cli import COMMAND_MODULES, build_parser, main

PIPELINE = ["broker", "ingest", "dataset", "reference", "train", "reward", "ppo", "evaluate", "models", "monitor",
            "retrain", "serve", "demo"]


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``run(*argv) -> (exit code, stdout, stderr)`` of ``ktoloop`` in-process, from an empty working directory."""
    for name in ("KTOLOOP_CONFIG", "KTOLOOP_HOME", "KTOLOOP_BOOTSTRAP"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        monkeypatch.delenv("KTOLOOP_CONFIG", raising=False)  # each call as from a fresh shell
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ktoloop: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])


def register_model(home: Path, model_id: str) -> None:
    from flows import registry
    from ktoloop.store import Store

    registry.register(Store(home / "ktoloop.duckdb"), registry.Candidate(
        model_id=model_id, method="kto", snapshot_id="snap-0123456789abcdef", snapshot_sha256="0" * 64,
        reference_name="smollm2-135m-instruct-q4_1", reference_sha256="1" * 64,
        model_version="smollm2-135m-instruct-q4_1", adapter_path=str(home / "models" / model_id), config={},
        metrics={"loss": 0.61234, "accuracy": 0.5812}, evaluation=None, status="candidate"))


@pytest.mark.parametrize("section, field", [
    ("[training]\nlr = -1\n", "training.lr"),
    ('[flows]\nsuite = "huge"\n', "flows.suite"),
    ("[ppo]\nlearning_rate = 0.1\n", "[ppo]"),
    ('[dataset.gates]\nmin_examples = "many"\n', "dataset.gates.min_examples"),
    ("[reward]\nbatch_size = 0\n", "reward.batch_size"),
    ("[monitoring]\nalpha = 2\n", "monitoring.alpha"),
])
@pytest.mark.parametrize("command", [["dataset", "list"], ["models", "list"], ["ingest", "stats"],
                                     ["reference", "show"], ["broker", "status"]])
def test_a_bad_value_in_any_section_fails_every_command_at_load_with_one_line(cli, tmp_path, section, field,
                                                                                 command):
    config = tmp_path / "ktoloop.toml"
    config.write_text(section)
    code, out, err = cli("--config", str(config), *command)
    one_line_error(code, err, field, str(config))
    assert out == ""
    assert not (tmp_path / ".ktoloop").exists() and not (tmp_path / "work" / ".ktoloop").exists()  # no work done


def test_home_and_data_dir_resolve_next_to_the_config_file_from_any_working_directory(cli, tmp_path):
    project = tmp_path / "project"
    (project / "inputs" / "feedback").mkdir(parents=True)
    (project / "ktoloop.toml").write_text('home = "state"\ndata_dir = "inputs"\n')
    register_model(project / "state", "kto-next-to-the-file")

    code, out, err = cli("--config", str(project / "ktoloop.toml"), "models", "list")  # run from tmp/work
    assert code == 0, err
    assert "kto-next-to-the-file" in out
    assert not (tmp_path / "work" / "state").exists() and not (tmp_path / "work" / ".ktoloop").exists()

    from ktoloop.config import load_settings

    settings = load_settings(project / "ktoloop.toml")
    assert settings.home_dir == (project / "state").resolve()
    assert settings.data_path == (project / "inputs").resolve()
    (project / "ktoloop.toml").write_text("")  # the default home is next to the file too
    assert load_settings(project / "ktoloop.toml").home_dir == (project / ".ktoloop").resolve()


def test_a_list_command_against_an_empty_home_says_so_and_creates_nothing(cli, tmp_path):
    code, out, err = cli("dataset", "list")
    assert code == 0
    assert f"no DuckDB file at {tmp_path / 'work' / '.ktoloop' / 'ktoloop.duckdb'}" in err
    assert not (tmp_path / "work" / ".ktoloop").exists()


def test_models_list_is_an_aligned_table_with_every_id_in_full(cli, tmp_path):
    long_id = "kto-" + "0123456789abcdef" * 5 + "-sweep3-beta0.1"
    home = tmp_path / "work" / ".ktoloop"
    register_model(home, long_id)
    register_model(home, "dpo-short")
    code, out, err = cli("models", "list")
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == ["model_id", "method", "snapshot_id", "status", "model_version", "heldout_loss",
                              "heldout_acc", "created_at"]
    rows = [line for line in lines[1:] if line.startswith(("kto-", "dpo-"))]
    assert len(rows) == 2 and any(row.startswith(long_id + " ") for row in rows)
    method_at = header.index("method")
    assert all(row[method_at - 2: method_at] == "  " and row[method_at:].startswith(("kto", "dpo")) for row in rows)
    loss_end = header.index("heldout_loss") + len("heldout_loss")
    assert all(row[:loss_end].endswith("0.6123") for row in rows)  # numbers right-aligned under their header
    assert lines[-1] == "serving: the base model (nothing promoted)"  # no pin here: no version line


def test_ingest_stats_shortens_dead_letter_reasons_and_reasons_shows_them_in_full(cli, tmp_path):
    from ingest.landing import Batch, land
    from ktoloop.store import Store

    reason = "event_id: " + "missing field, " * 20 + "END"
    land(Store(tmp_path / "work" / ".ktoloop" / "ktoloop.duckdb"), "g",
         Batch(rejects=[("feedback", 0, 0, b"{}", reason)], next_offsets={("feedback", 0): 1}))
    code, out, _ = cli("ingest", "stats")
    assert code == 0 and reason not in out and "event_id: missing field" in out and "--reasons" in out
    code, out, _ = cli("ingest", "stats", "--reasons")
    assert code == 0 and reason in out


def test_the_expected_failures_of_a_new_user_each_print_one_line_and_exit_2(cli, tmp_path):
    """Broker down for ``ingest drain`` belongs to the ingest tests (it needs a closed port and a timeout)."""
    missing = tmp_path / "nope.toml"
    one_line_error(*cli("--config", str(missing), "dataset", "list")[::2], "config file not found", str(missing))

    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nlr = 1\n")
    one_line_error(*cli("--config", str(bad), "dataset", "list")[::2], "not valid TOML", str(bad))

    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[kafka]\nbootstrap = "x:1"\n')
    one_line_error(*cli("--config", str(unknown), "ingest", "stats")[::2], "'bootstrap'", "[kafka]")

    top = tmp_path / "top.toml"
    top.write_text('hom = "x"\n')
    one_line_error(*cli("--config", str(top), "ingest", "stats")[::2], "'hom'", str(top))

    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[training]\nlr = "fast"\n')
    one_line_error(*cli("--config", str(wrong), "models", "list")[::2], "training.lr has the wrong type",
                   "expected float")

    one_line_error(*cli("dataset", "show", "no-such-snapshot")[::2], "snapshot 'no-such-snapshot' not found")
    one_line_error(*cli("models", "show", "no-such-model")[::2], "no model 'no-such-model'", "models list")

    empty = tmp_path / "empty-data"
    empty.mkdir()
    data = tmp_path / "data.toml"
    data.write_text(f'data_dir = "{empty.name}"\nhome = "h"\n')
    one_line_error(*cli("--config", str(data), "demo")[::2], str(empty.resolve() / "feedback"), "data_dir")

    locked = tmp_path / "locked.toml"
    locked.write_text('home = "locked-home"\n[store]\nlock_timeout_s = 0.3\n')
    db = tmp_path / "locked-home" / "ktoloop.duckdb"
    db.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        one_line_error(*cli("--config", str(locked), "dataset", "list")[::2], str(db), "locked")
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()


def walk(parser: argparse.ArgumentParser, path: str = "ktoloop"):
    """(command path, action) for every option, positional and subcommand under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_of_every_command_has_help_text():
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, a in walk(build_parser())
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert missing == []


def test_groups_are_listed_in_pipeline_order_in_help():
    assert list(COMMAND_MODULES) == PIPELINE
    text = build_parser().format_help()
    listing = text[text.index("COMMAND"):]
    positions = [listing.index(f"\n    {name} ") for name in PIPELINE]
    assert positions == sorted(positions), text


def test_help_imports_neither_torch_nor_the_data_stack():
    code = ("import sys; from ktoloop.cli import build_parser; build_parser().format_help(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'duckdb', 'pyarrow', 'polars', "
            "'prefect', 'transformers'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]", result.stdout


def test_evaluate_scores_the_pinned_reference_in_place_and_names_the_remedy_without_one(cli, tmp_path,
                                                                                       tiny_model_dir):
    from ktoloop.store import Store
    from training.reference import pin_reference

    config = tmp_path / "ktoloop.toml"
    config.write_text('home = "h"\n[monitoring]\nmax_length = 64\nquick_sizes = { winogrande = 4 }\n')
    one_line_error(*cli("--config", str(config), "evaluate", "--device", "cpu")[::2],
                   "pass --reference NAME or --base DIR", "materialize-smollm2")
    ref = pin_reference(tiny_model_dir, "tiny-v1", tmp_path / "h")
    code, out, err = cli("--config", str(config), "evaluate", "--device", "cpu")
    assert code == 0, err
    model_id = f"reference:{ref.name}:{ref.sha256[:12]}"  # the id the retrain flow stores the reference under
    assert model_id in out and "winogrande" in out
    assert Store(tmp_path / "h" / "ktoloop.duckdb").read("SELECT DISTINCT model_id FROM evaluations").rows() == [
        (model_id,)]
