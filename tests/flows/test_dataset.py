"""Dataset building on hand-built feedback in a real DuckDB file, through the real landing path."""

from __future__ import annotations

import dataclasses
import random
import re
import unicodedata

import pyarrow as pa
import pytest

from flows.dataset import DatasetConfig, build_dataset, decisions_of, kto_weights, normalize_prompts
from ktoloop.decision import IneligibleMethod, decide
from ingest.landing import Batch, land
from ingest.schema import EventDecoder, encode_event
from ktoloop import data
from ktoloop.methods import DataStats, GateConfig
from ktoloop.snapshot import load_snapshot
from ktoloop.store import Store

V1, V2 = "model-v1", "model-v2"


def event(i, prompt, response, label, version=V1, prompt_id=None, **extra):
    e = {"event_id": f"e{i}", "prompt": prompt, "response": response, "label": label, "model_version": version,
         "event_time": 1_700_000_000 + i, **extra}
    if prompt_id:
        e["prompt_id"] = prompt_id
    return e


def store_with(tmp_path, events, name="k.duckdb"):
    store = Store(tmp_path / name)
    decoder = EventDecoder()
    batch = Batch(events=[decoder.decode(encode_event(e)) for e in events],
                  positions=[("fb", 0, i) for i in range(len(events))], next_offsets={("fb", 0): len(events)})
    land(store, "g", batch)
    return store


def small_gates(**kw):
    return GateConfig(min_examples=kw.pop("min_examples", 1), warn_examples=kw.pop("warn_examples", 10),
                      min_pairs=kw.pop("min_pairs", 1), **kw)


def config(**kw):
    return DatasetConfig(gates=small_gates(**kw.pop("gates", {})), **kw)


def test_duplicates_collapse_conflicts_are_counted_and_excluded(tmp_path):
    events = [
        event(1, "p1", "good", "up"), event(2, "p1", "good", "up"),        # exact duplicate
        event(3, "p1", "bad", "down"),
        event(4, "p2", "flip", "up"), event(5, "p2", "flip", "down"),      # conflict: excluded, counted
        event(6, "p2", "fine", "up"),
        event(7, "p3", "other model", "up", version=V2),                   # another version: excluded, counted
    ]
    result = build_dataset(store_with(tmp_path, events), tmp_path, config(holdout_fraction=0.01), V1)
    c = result.snapshot.manifest.counts
    assert c["duplicates_collapsed"] == 1
    assert c["conflicts"] == 1 and c["answers"] == 4
    assert result.decision.noise_rate == pytest.approx(0.25)
    assert c["excluded_other_versions"] == 1 and c["other_versions"] == 1
    kto = result.snapshot.kto("train").vstack(result.snapshot.kto("eval"))
    assert sorted(kto["completion"].to_list()) == ["bad", "fine", "good"]
    assert "flip" not in kto["completion"].to_list() and "other model" not in kto["completion"].to_list()


def test_an_answer_reported_cut_off_reaches_the_trainer_marked_and_changes_the_snapshot(tmp_path):
    events = [event(1, "p1", "short and done", "up", truncated=False),
              event(2, "p1", "long and cut", "down", truncated=True), event(3, "p1", "long and cut", "down"),
              event(4, "p1", "not reported", "down")]
    result = build_dataset(store_with(tmp_path, events), tmp_path, config(holdout_fraction=0.01), V1)
    kto = result.snapshot.kto("train")
    assert dict(kto.select("completion", "truncated").rows()) == {
        "short and done": False, "long and cut": True, "not reported": False}  # any event reporting it cuts it
    [(rejected, chosen_cut, rejected_cut)] = result.snapshot.pairs("train").select(
        "rejected", "chosen_truncated", "rejected_truncated").rows()
    assert not chosen_cut and rejected_cut == (rejected == "long and cut")
    ended = [dict(e, truncated=False) for e in events]
    other = build_dataset(store_with(tmp_path, ended, "ended.duckdb"), tmp_path, config(holdout_fraction=0.01), V1)
    assert other.snapshot.manifest.snapshot_id != result.snapshot.manifest.snapshot_id  # what is trained differs


def test_pairs_only_within_one_prompt_and_one_model_version(tmp_path):
    rng = random.Random(0)
    events, i = [], 0
    for p in range(60):
        for version in (V1, V2):
            for r in range(rng.randint(0, 4)):
                label = rng.choice(["up", "down"])
                events.append(event(i, f"prompt {p}", f"answer {p}-{version}-{r}", label, version=version,
                                    prompt_id=f"pid-{p}"))
                i += 1
    # same text, no prompt_id: paired by normalised text (whitespace and case)
    events += [event(i + 1, "Hello   World", "hi!", "up"), event(i + 2, "hello world", "go away", "down")]
    result = build_dataset(store_with(tmp_path, events), tmp_path, config(max_pairs_per_prompt=2), V1)
    pairs = result.snapshot.pairs("train").vstack(result.snapshot.pairs("eval"))
    assert pairs.height > 10
    for row in pairs.iter_rows(named=True):
        chosen_p, chosen_v = row["chosen"].split()[1].split("-", 1) if row["chosen"] != "hi!" else ("x", V1)
        if row["chosen"] == "hi!":
            assert row["rejected"] == "go away"
            continue
        rejected_p, rejected_v = row["rejected"].split()[1].split("-", 1)
        assert chosen_p == rejected_p and row["prompt_key"] == f"id:pid-{chosen_p}"   # same prompt
        assert chosen_v.startswith(V1) and rejected_v.startswith(V1)                 # same (target) version
    assert pairs.group_by("prompt_key").len()["len"].max() <= 2                       # the cap
    assert "hi!" in pairs["chosen"].to_list()
    # each answer used once; chosen were thumbs up, rejected thumbs down
    assert pairs["chosen"].n_unique() == pairs.height and pairs["rejected"].n_unique() == pairs.height
    labels = {e["response"]: e["label"] for e in events}
    assert all(labels[c] == "up" for c in pairs["chosen"]) and all(labels[r] == "down" for r in pairs["rejected"])


def test_holdout_is_split_by_prompt(tmp_path):
    events = [event(i, f"prompt {i % 97}", f"answer {i}", "up" if i % 3 else "down") for i in range(2000)]
    result = build_dataset(store_with(tmp_path, events), tmp_path, config(holdout_fraction=0.2), V1)
    snap = result.snapshot
    train = set(snap.kto("train")["prompt_key"]) | set(snap.pairs("train")["prompt_key"])
    held = set(snap.kto("eval")["prompt_key"]) | set(snap.pairs("eval")["prompt_key"])
    assert train and held and not (train & held)
    assert 0.08 < len(held) / 97 < 0.35


def test_a_prompt_text_asked_under_two_ids_sits_in_one_split(tmp_path):
    events, i = [], 0
    for t in range(40):
        for pid in (f"a{t}", f"b{t}"):
            for label in ("up", "down"):
                events.append(event(i, f"Question number {t}?", f"answer {i}", label, prompt_id=pid))
                i += 1
    snap = build_dataset(store_with(tmp_path, events), tmp_path, config(holdout_fraction=0.5), V1).snapshot
    split_of: dict[str, set[str]] = {}
    for split in ("train", "eval"):
        for prompt in snap.kto(split)["prompt"]:
            split_of.setdefault(prompt, set()).add(split)
    assert len(split_of) == 40 and all(len(splits) == 1 for splits in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "eval"}


def test_unicode_spaces_and_compatibility_forms_are_the_same_prompt(tmp_path):
    variants = ["How do I boil an egg?", "How\u00a0do I  boil an egg?\u2003", "\uff28ow do I boil an egg?",
                "how do i\u3000boil an EGG?"]
    events = [event(k, prompt, f"answer {k}", "up" if k % 2 == 0 else "down") for k, prompt in enumerate(variants)]
    snap = build_dataset(store_with(tmp_path, events), tmp_path, config(holdout_fraction=0.01), V1).snapshot
    assert snap.kto("train")["prompt_key"].n_unique() == 1  # one prompt...
    assert snap.pairs("train").height == 2                   # ...so its ups and downs pair up


def test_the_prompt_text_trained_on_depends_on_content_not_arrival_order(tmp_path):
    """One answer under one prompt id, asked with two spellings of the prompt: the text written is the same
    whichever event landed first, and the content hash covers it."""
    events = [event(1, "What is tea?", "A drink.", "up", prompt_id="p1"),
              event(2, "what is  TEA?", "A drink.", "up", prompt_id="p1"),
              event(3, "What is tea?", "Nothing.", "down", prompt_id="p1")]
    built = [build_dataset(store_with(tmp_path, order, f"{n}.duckdb"), tmp_path / str(n), config(holdout_fraction=0.01),
                           V1).snapshot for n, order in enumerate((events, events[::-1]))]
    texts = [sorted(zip(s.kto("train")["completion"], s.kto("train")["prompt"])) for s in built]
    assert texts[0] == texts[1]
    assert built[0].manifest.content_sha256 == built[1].manifest.content_sha256
    spelled = [build_dataset(store_with(tmp_path, [first, events[2]], f"s{n}.duckdb"), tmp_path / f"s{n}",
                             config(holdout_fraction=0.01), V1).snapshot for n, first in enumerate(events[:2])]
    # same answers, labels and prompt id, another prompt text written: another snapshot
    assert spelled[0].manifest.content_sha256 != spelled[1].manifest.content_sha256


@pytest.mark.parametrize("n_d,n_u", [(1000, 1000), (100, 1000), (1000, 100), (1000, 999), (5, 100_000)])
def test_kto_weight_rule(n_d, n_u):
    w = kto_weights(n_d, n_u, cap=10.0)
    ratio = w["desirable"] * n_d / (w["undesirable"] * n_u)
    assert 1.0 - 1e-9 <= ratio <= 4 / 3 + 1e-9
    assert ratio == pytest.approx(w["ratio"])
    assert max(w["desirable"], w["undesirable"]) <= 10.0
    if n_d == n_u:
        assert w["desirable"] == w["undesirable"] == 1.0


def test_kto_weights_recorded_with_the_snapshot_for_imbalanced_data(tmp_path):
    events = [event(i, f"p{i}", f"r{i}", "up" if i % 11 == 0 else "down") for i in range(1100)]  # 1:10
    manifest = build_dataset(store_with(tmp_path, events), tmp_path, config(), V1).snapshot.manifest
    n_d, n_u = manifest.counts["kto_train_desirable"], manifest.counts["kto_train_undesirable"]
    w = manifest.kto_weights
    assert n_u > 8 * n_d
    assert 1.0 - 1e-9 <= w["desirable"] * n_d / (w["undesirable"] * n_u) <= 4 / 3 + 1e-9


def stats(usable=600, pairs=0, conflicts=0, units=None, reward_model=False):
    return DataStats(desirable=usable // 2, undesirable=usable - usable // 2, pairs=pairs, conflicts=conflicts,
                     units=units if units is not None else usable + conflicts, reward_model=reward_model)


def test_sufficiency_boundaries_499_500_5000():
    gates = GateConfig()
    refused = decide(stats(499), gates)
    assert not refused.train and refused.method is None
    assert "499 usable training examples" in refused.reasons[0] and "< 500" in refused.reasons[0]
    warned = decide(stats(500), gates)
    assert warned.train and warned.method == "kto" and "500 usable examples (< 5000)" in warned.warnings[0]
    assert decide(stats(4999), gates).warnings
    clean = decide(stats(5000), gates)
    assert clean.train and clean.warnings == []


def test_eligibility_outcomes_for_each_method():
    gates = GateConfig(min_pairs=1000, max_noise_rate=0.05)
    assert decide(stats(6000, pairs=999), gates).eligibility["dpo"]["eligible"] is False
    clean = decide(stats(6000, pairs=1000, conflicts=10, units=6000), gates)
    assert clean.method == "kto"  # KTO is the default even when DPO is allowed
    assert clean.eligibility["dpo"]["eligible"] and not clean.eligibility["ipo"]["eligible"]
    noisy = decide(stats(6000, pairs=1000, conflicts=600, units=6000), gates)
    assert noisy.eligibility["ipo"]["eligible"] and not noisy.eligibility["dpo"]["eligible"]
    assert "label noise 10.0%" in noisy.eligibility["dpo"]["reason"]
    assert decide(stats(6000, pairs=1000), gates, forced="dpo").method == "dpo"
    with pytest.raises(IneligibleMethod, match="'ipo' is not eligible: label noise 0.0%"):
        decide(stats(6000, pairs=1000), gates, forced="ipo")
    # PPO: only enabled, with a budget, and with a reward model
    assert "not enabled" in decide(stats(6000), gates).eligibility["ppo"]["reason"]
    budgetless = dataclasses.replace(gates, ppo_enabled=True)
    assert "compute budget" in decide(stats(6000), budgetless).eligibility["ppo"]["reason"]
    budgeted = dataclasses.replace(budgetless, ppo_budget_tokens=100_000)
    assert "no reward model" in decide(stats(6000), budgeted).eligibility["ppo"]["reason"]
    assert decide(stats(6000, reward_model=True), budgeted, forced="ppo").method == "ppo"
    preferred = dataclasses.replace(gates, preference=["dpo", "kto"])
    assert decide(stats(6000, pairs=1000), preferred).method == "dpo"
    assert decide(stats(6000, pairs=10), preferred).method == "kto"


def test_forcing_an_ineligible_method_fails_with_the_reason(tmp_path):
    events = [event(i, f"p{i}", f"r{i}", "up" if i % 2 else "down") for i in range(40)]  # no pairs
    with pytest.raises(IneligibleMethod, match="'dpo' is not eligible: only 0 same-prompt pairs"):
        build_dataset(store_with(tmp_path, events), tmp_path, config(gates={"min_pairs": 5}), V1, force_method="dpo")


def test_under_500_snapshot_records_no_training(tmp_path):
    events = [event(i, f"p{i}", f"r{i}", "up" if i % 2 else "down") for i in range(300)]
    result = build_dataset(store_with(tmp_path, events), tmp_path, DatasetConfig(), V1)
    assert not result.decision.train
    assert "< 500; no training" in result.decision.reasons[0]
    stored = Store(tmp_path / "k.duckdb").read("SELECT snapshot_id, train FROM decisions")
    assert stored.rows() == [(result.snapshot.manifest.snapshot_id, False)]


def test_same_data_same_hash_even_landed_in_another_order(tmp_path):
    events = [event(i, f"prompt {i % 50}", f"answer {i}", "up" if i % 3 else "down", prompt_id=f"p{i % 50}")
              for i in range(1500)]
    first = build_dataset(store_with(tmp_path, events), tmp_path / "a", config(), V1)
    again = build_dataset(Store(tmp_path / "k.duckdb"), tmp_path / "a", config(), V1)
    shuffled = events[:]
    random.Random(1).shuffle(shuffled)
    other = build_dataset(store_with(tmp_path, shuffled, "other.duckdb"), tmp_path / "b", config(), V1)
    assert again.reused and again.snapshot.manifest.content_sha256 == first.snapshot.manifest.content_sha256
    assert other.snapshot.manifest.content_sha256 == first.snapshot.manifest.content_sha256
    changed = build_dataset(store_with(tmp_path, events[:-1], "fewer.duckdb"), tmp_path / "c", config(), V1)
    assert changed.snapshot.manifest.content_sha256 != first.snapshot.manifest.content_sha256


def test_a_snapshot_is_immutable_and_each_rule_setting_has_its_own_decision(tmp_path):
    """The same data under stricter gates is the same snapshot, untouched, with a second decision beside the
    first in the ``decisions`` table, keyed by (snapshot, rule settings)."""
    events = [event(i, f"prompt {i % 50}", f"answer {i}", "up" if i % 3 else "down", prompt_id=f"p{i % 50}")
              for i in range(1500)]
    store = store_with(tmp_path, events)
    first = build_dataset(store, tmp_path / "a", config(), V1)
    manifest = (first.snapshot.path / "manifest.json").read_bytes()
    strict = build_dataset(store, tmp_path / "a", config(gates={"min_examples": 10_000, "warn_examples": 10_000}), V1)
    assert strict.reused and first.decision.train and not strict.decision.train
    assert (strict.snapshot.path / "manifest.json").read_bytes() == manifest
    again = build_dataset(store, tmp_path / "a", config(), V1)  # the first settings again: the same decision
    assert again.decision == first.decision
    recorded = decisions_of(store, first.snapshot.manifest.snapshot_id)
    assert sorted((d.key, d.train) for d in recorded) == sorted([(first.decision.key, True),
                                                                 (strict.decision.key, False)])
    assert first.decision.key != strict.decision.key


def test_real_hh_rlhf_feedback(tmp_path, shared_data):
    from ingest.hh_rlhf import convert

    events = list(convert(shared_data / data.HH_RLHF_HARMLESS_TEST, V1))
    result = build_dataset(store_with(tmp_path, events), tmp_path, DatasetConfig(), V1)
    c, d = result.snapshot.manifest.counts, result.decision
    assert c["answers"] == len(events) == 4606
    assert c["pairs_train"] + c["pairs_eval"] == len(events) // 2 == 2303  # one pair per HH comparison
    assert c["prompts_with_pairs"] == c["prompts"] == 2301  # two prompts recur in HH
    assert d.train and d.method == "kto" and d.warnings  # 4,148 usable < 5,000
    assert d.eligibility["dpo"]["eligible"]


@pytest.mark.slow
def test_cli_builds_only_for_a_pinned_reference_version(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from training.reference import pin_reference

    home = tmp_path / "home"
    store_with(home, [event(i, f"p{i}", f"r{i}", "up" if i % 2 else "down") for i in range(40)], "ktoloop.duckdb")
    config = tmp_path / "k.toml"
    config.write_text(f'home = "{home}"\n')
    cli = [sys.executable, "-m", "ktoloop.cli", "--config", str(config), "dataset", "build"]
    unpinned = subprocess.run(cli, capture_output=True, text=True)
    assert unpinned.returncode == 2 and "no pinned base model" in unpinned.stderr
    pin_reference(tiny_model_dir, V1, home)
    other = subprocess.run(cli + ["--model-version", V2], capture_output=True, text=True)
    assert other.returncode == 2 and f"model version '{V2}' has no pinned reference" in other.stderr
    built = subprocess.run(cli, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "events in window 40," in built.stdout
    assert "decision: NO TRAINING" in built.stdout and "< 500; no training" in built.stdout


def test_no_events_of_the_version_is_a_clean_no_training_decision(tmp_path):
    store = store_with(tmp_path, [event(1, "p", "r", "up", version=V2)])
    result = build_dataset(store, tmp_path, DatasetConfig(), V1)
    counts = result.snapshot.manifest.counts
    assert (counts["events_in_window"], counts["excluded_other_versions"], counts["answers"]) == (1, 1, 0)
    assert not result.decision.train and "0 usable training examples" in result.decision.reasons[0]


def test_minimum_lengths_and_sources_filter_the_window(tmp_path):
    events = [event(i, f"prompt {i}", "ok" if i % 2 else "a longer answer", "up", source="web" if i % 3 else "app")
              for i in range(30)]
    store = store_with(tmp_path, events)
    counts = build_dataset(store, tmp_path / "a", config(min_response_chars=5), V1).snapshot.manifest.counts
    assert counts["events_in_window"] == counts["answers"] == 15  # the 2-character answers are out
    counts = build_dataset(store, tmp_path / "b", config(sources=["app"], min_prompt_chars=9), V1).snapshot.manifest.counts
    assert counts["events_in_window"] == 6  # source app (i % 3 == 0) and 9+ characters (i >= 10): 12, 15, ..., 27


@pytest.mark.slow
def test_the_cli_and_the_flows_build_the_same_snapshot_and_decision(tmp_path, tiny_model_dir):
    """One door: ``ktoloop dataset build`` and the retrain flow's build step (``flows.loop.build``) see the same
    data and the same reward model, so they record the same decision (PPO eligible once a reward model exists;
    the CLI used to build without asking and overwrote the flow's decision with "no reward model")."""
    from flows.loop import build, store_of
    from ktoloop.cli import main
    from ktoloop.config import load_settings
    from training.reference import pin_reference
    from training.reward import RewardConfig, pin_reward_model, train_reward

    config = tmp_path / "ktoloop.toml"
    config.write_text('home = "home"\n[dataset]\nholdout_fraction = 0.2\n[dataset.gates]\nmin_examples = 10\n'
                      'min_pairs = 10\nppo_enabled = true\nppo_budget_tokens = 4096\n')
    settings = load_settings(config)
    reference = pin_reference(tiny_model_dir, V1, settings.home_dir)
    store_with(settings.home_dir, [event(2 * i + k, f"Tell me about topic {i}.", answer, k == 0)
                                   for i in range(60) for k, answer in enumerate(("Sure, gladly!", "no."))],
               name="ktoloop.duckdb")
    first = build(settings)
    assert first.decision.eligibility["ppo"]["reason"].startswith("no reward model")
    rm = train_reward(RewardConfig(max_steps=1, batch_size=4, device="cpu"), first.snapshot, reference,
                      tmp_path / "rm")
    pin_reward_model(rm.out_dir, settings.home_dir, "rm-1")

    assert main(["--config", str(config), "dataset", "build"]) == 0
    by_cli = decisions_of(store_of(settings), first.snapshot.manifest.snapshot_id)[0]  # the latest recorded
    by_flow = build(settings).decision
    assert by_cli == by_flow
    assert by_flow.eligibility["ppo"] == {"eligible": True, "reason": "eligible"}


# Unicode's White_Space property (PropList.txt), written out: Python's str.isspace adds U+001C-U+001F.
WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000")


def test_prompt_normalisation_is_nfkc_then_each_whitespace_run_as_one_space_trimmed_and_lower_case():
    run = f"[{re.escape(WHITE_SPACE)}]+"

    def plain(text: str) -> str:
        return re.sub(run, " ", unicodedata.normalize("NFKC", text)).strip(WHITE_SPACE).lower()

    texts = [form.format(c=c) for c in WHITE_SPACE for form in ("a{c}b", "a{c} b", "a {c}{c} b", "{c}A{c}", "{c}")]
    texts += ["Ｆｕｌｌ　ｗｉｄｔｈ", "ﬁne  Tea?", "x\x1cy \u200b z", "a  b", "", "   ", "One space only."]
    assert normalize_prompts(pa.array(texts)).to_pylist() == [plain(t) for t in texts]
