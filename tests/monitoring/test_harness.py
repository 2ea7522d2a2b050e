"""The log-likelihood scorer and the harness, on the tiny random model with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ktoloop import data
from ktoloop.store import Store
from monitoring.benchmarks import ChoiceItem
from monitoring.config import MonitorConfig
from monitoring.harness import evaluate, latest_run_id, load_item_scores, run_suite, sample_ids
from monitoring.regression import check_regression
from monitoring.scoring import Request, Score, encode_pair, loglikelihood, rolling_requests
from monitoring.tasks import TASKS, ChoiceKind


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from training.modeling import load_model

    return load_model(tiny_model_dir, device="cpu")


def by_hand(model, request: Request) -> tuple[float, bool]:
    """One unpadded forward, full logits: the reference the batched scorer must match."""
    ids = torch.tensor([list(request.context + request.continuation)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(request.context)
    total, greedy = 0.0, True
    for pos, token in enumerate(request.continuation):
        row = logprobs[start + pos - 1]
        total += float(row[token])
        greedy &= int(row.argmax()) == token
    return total, greedy


def test_scorer_matches_hand_computation(tiny):
    model, tok = tiny
    pairs = [("The cat sat", " on the mat."), ("Question: What is 2 + 2?\nAnswer:", " 4"),
             ("A much longer context that forces padding in the batch, with several more words in it", " indeed"),
             ("x", " y z w v u t s r q")]
    requests = [encode_pair(tok, c, x) for c, x in pairs]
    # a small token budget splits the requests over several padded batches
    scores = loglikelihood(model, requests, batch_tokens=64, pad_id=tok.pad_token_id, progress=False)
    for request, score in zip(requests, scores):
        expected, greedy = by_hand(model, request)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.greedy == greedy
        assert score.tokens == len(request.continuation)


def test_options_sharing_a_question_are_scored_as_alone_and_long_requests_keep_their_window(tiny):
    model, tok = tiny
    question = "Question: Which gas do plants take in from the air?\nAnswer:"
    options = [" carbon dioxide", " oxygen", " nitrogen, mostly", " water vapour and a little dust"]
    requests = [encode_pair(tok, question, o) for o in options]
    requests.append(encode_pair(tok, "Some text that runs well past the window of the scorer, with many more words "
                                     "than it can see at once, so that its start is cut", " and its continuation"))
    assert len(requests[4].context + requests[4].continuation) > 27
    # 26 tokens: the question and its four options fit in one row; the long request is cut to its last 27
    scores = loglikelihood(model, requests, batch_tokens=64, max_length=26, pad_id=tok.pad_token_id, progress=False)
    for request, score in zip(requests[:4], scores):
        expected, greedy = by_hand(model, request)
        assert (score.logprob, score.greedy, score.tokens) == (pytest.approx(expected, abs=1e-4), greedy,
                                                               len(request.continuation))
    window = list(requests[4].context + requests[4].continuation)[-27:]
    scored = len(requests[4].continuation)
    expected, greedy = by_hand(model, Request(tuple(window[:-scored]), tuple(window[-scored:])))
    assert (scores[4].logprob, scores[4].greedy, scores[4].tokens) == (pytest.approx(expected, abs=1e-4), greedy,
                                                                       scored)


def test_encode_pair_moves_trailing_space_to_continuation(tiny):
    _, tok = tiny
    a, b = encode_pair(tok, "Answer: ", "yes"), encode_pair(tok, "Answer:", " yes")
    assert a == b
    assert tok.decode(list(a.continuation)) == " yes"


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(100, 137))
    requests = rolling_requests(tokens, prefix=0, max_length=8)
    assert [t for r in requests for t in r.continuation] == tokens
    assert all(len(r.context) + len(r.continuation) <= 9 for r in requests)
    assert requests[0].context == (0,)


def test_acc_and_acc_norm_differ_on_a_constructed_case():
    # option 0 is short and likelier in total; option 1 is long and likelier per character (the gold one)
    item = ChoiceItem(("Q:", "Q:"), (" no", " a much longer answer"), gold=1, chars=(2, 20))
    scores = [Score(-4.0, False, 1), Score(-6.0, False, 4)]
    assert ChoiceKind().score(item, scores) == {"acc": 0.0, "acc_norm": 1.0}


def test_quick_sample_is_fixed_by_seed():
    assert sample_ids("piqa", 1000, 50, 7) == sample_ids("piqa", 1000, 50, 7)
    assert sample_ids("piqa", 1000, 50, 7) != sample_ids("piqa", 1000, 50, 8)
    assert sample_ids("piqa", 10, 50, 7) == list(range(10))


@pytest.fixture()
def bench_dir(tmp_path, shared_data):
    """Small copies of the real benchmark files (first items), so the tiny model runs every task quickly."""
    src = shared_data / data.BENCHMARKS
    for name in ["arc_easy.jsonl", "piqa.jsonl", "winogrande.jsonl", "lambada_openai.jsonl"]:
        lines = (src / name).read_text().splitlines()[:12]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    import bz2

    hs = bz2.open(src / "hellaswag_val_full.txt.bz2", "rt").read().split("\n")[: 6 * 6]
    with bz2.open(tmp_path / "hellaswag_val_full.txt.bz2", "wt") as fh:
        fh.write("\n".join(hs) + "\n")
    wiki = (src / "wikitext2_test.txt").read_text().split("\n")[:40]
    (tmp_path / "wikitext2_test.txt").write_text("\n".join(wiki))
    return tmp_path


@pytest.mark.slow
def test_every_task_runs_and_runs_compare_from_the_store(tiny_model_dir, bench_dir, tmp_path):
    config = MonitorConfig(benchmarks_dir=str(bench_dir), max_length=64, seed=3,
                           quick_sizes={"arc_easy": 8, "piqa": 8, "winogrande": 8, "lambada": 8, "hellaswag": 4,
                                        "wikitext2": 2})
    store = Store(tmp_path / "k.duckdb")
    first = run_suite(tiny_model_dir, suite="quick", config=config, store=store, model_id="tiny", device="cpu",
                      progress=False)
    second = run_suite(tiny_model_dir, suite="quick", config=config, store=store, model_id="tiny", device="cpu",
                       progress=False)
    assert set(first.results) == set(config.quick_sizes)
    for bench, metric, value, stderr, n in first.table():
        assert math.isfinite(value), (bench, metric)
    assert first.results["wikitext2"].metrics["bits_per_byte"][0] > 0
    rows = store.read("SELECT benchmark, metric, value, n FROM evaluations WHERE run_id = ?", [first.run_id])
    assert len(rows) == len(first.table())
    assert load_item_scores(store, first.run_id)["piqa"]["acc_norm"].keys() == set(first.results["piqa"].item_ids)
    assert latest_run_id(store, "tiny", "quick") in {first.run_id, second.run_id}
    # the same model on the same items: identical scores, the check passes with zero drop
    result = check_regression(store, second.run_id, first.run_id, config)
    assert result.passed, result.summary()
    assert all(c.drop == pytest.approx(0.0, abs=1e-9) for c in result.checks)


def test_full_suite_reads_whole_files(tiny, bench_dir):
    model, tok = tiny
    config = MonitorConfig(benchmarks_dir=str(bench_dir), max_length=64, full_benchmarks=["winogrande"])
    results = evaluate(model, tok, "full", config=config, progress=False)
    assert results["winogrande"].n == 12
    assert set(results["winogrande"].metrics) == set(TASKS["winogrande"].metrics)


def test_missing_benchmark_file_is_named(tiny, tmp_path):
    model, tok = tiny
    config = MonitorConfig(benchmarks_dir=str(tmp_path), quick_sizes={"piqa": 2})
    with pytest.raises(Exception, match="piqa.jsonl not found"):
        evaluate(model, tok, "quick", config=config, progress=False)


def test_unknown_quick_benchmark_named(tiny):
    model, tok = tiny
    with pytest.raises(Exception, match="boolq"):
        evaluate(model, tok, "quick", benchmarks=["boolq"], progress=False)


def test_config_rejects_bad_values():
    from ktoloop.config import ConfigError

    with pytest.raises(ConfigError, match="monitoring.alpha"):
        MonitorConfig(alpha=2.0)
    with pytest.raises(ConfigError, match="quick_sizes.piqa"):
        MonitorConfig(quick_sizes={"piqa": 0})
    json.dumps(MonitorConfig().quick_sizes)  # plain data, so it can be logged with a run


def test_benchmarks_dir_follows_data_dir_unless_set(tmp_path):
    from ktoloop.config import load_settings
    from monitoring.config import load_monitor_config

    assert MonitorConfig().benchmarks_path == data.packaged_dir() / data.BENCHMARKS
    config = tmp_path / "ktoloop.toml"
    config.write_text(f'data_dir = "{tmp_path / "copy"}"\n')
    assert load_monitor_config(load_settings(config)).benchmarks_path == (tmp_path / "copy").resolve() / data.BENCHMARKS
    config.write_text(f'data_dir = "{tmp_path / "copy"}"\n[monitoring]\nbenchmarks_dir = "{tmp_path / "b"}"\n')
    assert load_monitor_config(load_settings(config)).benchmarks_path == (tmp_path / "b").resolve()


def test_cli_evaluate_with_monitoring_section(tiny_model_dir, bench_dir, tmp_path, monkeypatch, capsys):
    from ktoloop.cli import main

    config = tmp_path / "ktoloop.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[monitoring]\nbenchmarks_dir = "{bench_dir}"\n'
                      'max_length = 64\nquick_sizes = {winogrande = 6, piqa = 4}\n')
    monkeypatch.delenv("KTOLOOP_HOME", raising=False)
    assert main(["--config", str(config), "evaluate", "--suite", "quick", "--base", str(tiny_model_dir),
                 "--benchmarks", "winogrande", "--model-id", "tiny-v1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "winogrande" in out and "tiny-v1" in out and "piqa" not in out
    rows = Store(tmp_path / "home" / "ktoloop.duckdb").read("SELECT model_id, benchmark, n FROM evaluations")
    assert rows.rows() == [("tiny-v1", "winogrande", 6)]
    assert (tmp_path / "home" / "monitoring" / "workspace").is_dir()
    config.write_text('[monitoring]\nbatch_tokens = "big"\n')
    assert main(["--config", str(config), "evaluate", "--base", str(tiny_model_dir)]) == 2  # named config error
    assert "monitoring.batch_tokens" in capsys.readouterr().err
