"""Build a training snapshot from landed feedback: clean, split by prompt, pair same-prompt answers, weigh, decide.

All set work is DuckDB SQL over one read-only connection (a consistent view; the consumer's writes wait
for it). The output is Parquet plus a manifest (see ``ktoloop.snapshot``) whose id is the hash of the
content, so building twice from the same data yields the same snapshot and the trainers can reuse work.
A snapshot is written once and never changed; the method decision about it (``ktoloop.decision``) is
recorded beside it in the ``decisions`` table, one row per snapshot and rule settings.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from duckdb.sqltypes import VARCHAR

from flows.config import DatasetConfig  # the [dataset] section lives there: loading it needs no DuckDB
from ktoloop.decision import Decision, decide_snapshot
from ktoloop.snapshot import KTO_FILE, MANIFEST, PAIRS_FILE, Manifest, Snapshot, load_snapshot, snapshots_dir
from ktoloop.store import Store

log = logging.getLogger(__name__)

KTO_LOWER, KTO_UPPER = 1.0, 4.0 / 3.0  # KTO paper: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]


@dataclass(frozen=True)
class BuildResult:
    snapshot: Snapshot
    decision: Decision
    reused: bool
    seconds: float


def kto_weights(desirable: int, undesirable: int, cap: float = 10.0) -> dict[str, float]:
    """Class weights with lambda_D*n_D / (lambda_U*n_U) in [1, 4/3], the smaller weight 1 when the cap allows.

    Balanced data keeps (1, 1). Too many thumbs up: up-weight the downs to reach 4/3. Too many downs:
    up-weight the ups to reach 1. When the larger weight would pass ``cap``, it is set to ``cap`` and the
    smaller one scaled below 1 instead, so the ratio still holds.
    """
    if desirable == 0 or undesirable == 0:
        return {"desirable": 1.0, "undesirable": 1.0, "ratio": float("nan")}
    raw = desirable / undesirable
    target = min(max(raw, KTO_LOWER), KTO_UPPER)
    # lambda_D / lambda_U must equal target / raw
    relative = target / raw
    lam_d, lam_u = (relative, 1.0) if relative >= 1 else (1.0, 1.0 / relative)
    larger = max(lam_d, lam_u)
    if larger > cap:
        lam_d, lam_u = lam_d * cap / larger, lam_u * cap / larger
    return {"desirable": lam_d, "undesirable": lam_u, "ratio": lam_d * desirable / (lam_u * undesirable)}


# --- the SQL, in the order it runs ---------------------------------------------------------------------
# A view, so the text is not copied; views cannot take prepared parameters, so they sit in a one-row table.
SCOPE_SQL = """
CREATE OR REPLACE TEMP TABLE scope_params
    (since TIMESTAMPTZ, until TIMESTAMPTZ, sources VARCHAR[], min_prompt INTEGER, min_response INTEGER);
CREATE OR REPLACE TEMP VIEW scoped AS
SELECT feedback.rowid AS rid, response, label, truncated, model_version, prompt_id, hash(prompt) AS prompt_hash
FROM feedback, scope_params p
WHERE event_time >= p.since AND event_time < p.until
  AND (len(p.sources) = 0 OR list_contains(p.sources, source))
  AND length(prompt) >= p.min_prompt AND length(response) >= p.min_response
"""
# The target version's ($1) events as integers: each text is hashed once here, not again by every step.
EVENTS_SQL = """
CREATE OR REPLACE TEMP TABLE events AS
SELECT rid, hash(response) AS response_hash, label, truncated, prompt_id, prompt_hash
FROM scoped WHERE model_version = $1
"""
# The normalised text of each distinct raw prompt, normalised once per prompt rather than once per event
# (``normalize_prompts``: NFKC, Unicode whitespace, case).
PROMPT_TEXTS_SQL = """
CREATE OR REPLACE TEMP TABLE prompt_texts AS
SELECT t.prompt_hash, md5(ktoloop_normalize(f.prompt)) AS text_key
FROM (SELECT prompt_hash, min(rid) AS rid FROM events GROUP BY prompt_hash) t
JOIN feedback f ON f.rowid = t.rid
"""
# One row per distinct answer: (prompt_key, 64-bit hash of the response), with the rowid of one of its
# events to fetch the text when writing: the event whose raw prompt hashes lowest, so
# the prompt text trained on is a function of the content (and in its hash), not of arrival order. Set work
# on integers instead of carrying 10M texts through GROUP BY and window is what keeps a 10M-event build in
# seconds. Exact duplicates collapse here; an answer labelled both up and down is a conflict; an answer
# reported cut off at the serving token limit by any of its events is trained as cut off (no end-of-turn).
# The holdout ($1 salt, $2 share) is drawn per group of prompts that share an id or a normalised text (linked
# over two hops: a text asked under two ids, an id asked with two texts), so no prompt is in both splits;
# md5 (not DuckDB's hash) keeps it stable across DuckDB versions. Prompt keys are built once per distinct
# (prompt id, raw prompt), not once per event.
UNITS_SQL = """
CREATE OR REPLACE TEMP TABLE units AS
WITH keyed AS (
    SELECT k.prompt_id, k.prompt_hash, t.text_key,
           coalesce('id:' || k.prompt_id, 'text:' || t.text_key) AS prompt_key
    FROM (SELECT DISTINCT prompt_id, prompt_hash FROM events) k JOIN prompt_texts t USING (prompt_hash)
), answers AS (
    SELECT k.prompt_key, e.response_hash, arg_min(e.rid, e.prompt_hash) AS rid,
           min(e.prompt_hash) AS prompt_hash,
           bool_and(e.label) AS label,
           bool_or(e.label) AND NOT bool_and(e.label) AS conflict,
           coalesce(bool_or(e.truncated), false) AS truncated,  -- NULL: not reported, taken as ended
           count(*) AS events
    FROM events e JOIN keyed k ON e.prompt_hash = k.prompt_hash AND e.prompt_id IS NOT DISTINCT FROM k.prompt_id
    GROUP BY k.prompt_key, e.response_hash
), links AS (
    SELECT DISTINCT prompt_key, text_key FROM keyed
), key_text AS (
    SELECT prompt_key, min(text_key) AS group_key FROM links GROUP BY prompt_key
), text_group AS (
    SELECT text_key, min(group_key) AS group_key FROM links JOIN key_text USING (prompt_key) GROUP BY text_key
), prompts AS (
    SELECT prompt_key,
           ('0x' || md5($1 || min(group_key))[1:8])::UBIGINT < ($2 * 4294967296)::UBIGINT AS is_eval
    FROM links JOIN text_group USING (text_key) GROUP BY prompt_key
)
SELECT * FROM answers JOIN prompts USING (prompt_key)
"""
# Zip each prompt's ups with its downs (in a fixed pseudo-random order): at most max_pairs ($1) per prompt and
# each answer in at most one pair. Both sides share prompt_key, so never two different prompts.
PAIRS_SQL = """
CREATE OR REPLACE TEMP TABLE pairs AS
WITH ranked AS (
    SELECT prompt_key, response_hash, label, is_eval,
           row_number() OVER (PARTITION BY prompt_key, label ORDER BY response_hash) AS rn
    FROM units WHERE NOT conflict
)
SELECT up.prompt_key, up.response_hash AS chosen_hash, down.response_hash AS rejected_hash, up.is_eval
FROM ranked up JOIN ranked down ON up.prompt_key = down.prompt_key AND up.rn = down.rn
WHERE up.label AND NOT down.label AND up.rn <= $1
"""
# The text is fetched only here, by rowid, in one pass for both splits; pairs name their answers by
# (prompt_key, response hash) and carry no text (the snapshot contract in ktoloop.snapshot). Writing the
# splits to separate files or the pairs with their text re-reads the feedback text per file: 10M events
# took 20.4-22.4 s that way; a partitioned COPY was slower still.
KTO_FILE_SQL = """
SELECT f.prompt, f.response AS completion, u.label, u.prompt_key, u.truncated, u.response_hash AS answer_id,
       CASE WHEN u.is_eval THEN 'eval' ELSE 'train' END AS split
FROM units u JOIN feedback f ON f.rowid = u.rid WHERE NOT u.conflict
"""
PAIRS_FILE_SQL = """
SELECT prompt_key, chosen_hash AS chosen_id, rejected_hash AS rejected_id,
       CASE WHEN is_eval THEN 'eval' ELSE 'train' END AS split
FROM pairs
"""
SPLITS = (("train", "false"), ("eval", "true"))
SNAPSHOT_FORMAT = "3"
"""Part of the content hash: the same rows in another file layout are another snapshot."""


def build_dataset(store: Store, home: str | Path, config: DatasetConfig, model_version: str, *,
                  since: dt.datetime | None = None, until: dt.datetime | None = None,
                  force_method: str | None = None, reward_model: bool = False) -> BuildResult:
    """Build (or reuse) the snapshot of ``model_version``'s feedback in [since, until) and decide the method."""
    started = time.monotonic()
    since = since or dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    until = until or dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)
    root = snapshots_dir(home)
    work = root / f".building-{time.time_ns()}"
    work.mkdir(parents=True)
    try:
        with store.reader() as con:
            con.execute(SCOPE_SQL)
            con.execute("INSERT INTO scope_params VALUES (?, ?, ?, ?, ?)",
                        [since, until, config.sources, config.min_prompt_chars, config.min_response_chars])
            con.create_function("ktoloop_normalize", normalize_prompts, [VARCHAR], VARCHAR, type="arrow")
            con.execute(EVENTS_SQL, [model_version])
            con.execute(PROMPT_TEXTS_SQL)
            con.execute(UNITS_SQL, [config.split_salt, config.holdout_fraction])
            con.execute(PAIRS_SQL, [config.max_pairs_per_prompt])
            counts = _counts(con, model_version)
            content = _content_hash(con)
            _copy(con, KTO_FILE_SQL, work / KTO_FILE)
            _copy(con, PAIRS_FILE_SQL, work / PAIRS_FILE)
            watermark = _watermark(con)
        snapshot_id = f"ds-{content[:12]}"
        data = {k: v for k, v in asdict(config).items() if k != "gates"}  # the gates shape decisions, not data
        manifest = Manifest(
            snapshot_id=snapshot_id, content_sha256=content, model_version=model_version,
            kto_weights=kto_weights(counts["kto_train_desirable"], counts["kto_train_undesirable"],
                                    config.max_class_weight),
            counts=counts,
            params={"since": since.isoformat(), "until": until.isoformat(), "model_version": model_version, **data},
            query="\n".join((SCOPE_SQL, EVENTS_SQL, PROMPT_TEXTS_SQL, UNITS_SQL, PAIRS_SQL, KTO_FILE_SQL,
                             PAIRS_FILE_SQL)), watermark=watermark,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        )
        (work / MANIFEST).write_text(manifest.to_json())
        final = root / snapshot_id
        reused = final.exists()
        if reused:  # same content already snapshotted: it stays as first written
            shutil.rmtree(work)
        else:
            work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    snapshot = load_snapshot(final)
    _record(store, snapshot, final)
    decision = decide_snapshot(snapshot_id, snapshot.manifest.counts, config.gates, force_method, reward_model)
    record_decision(store, decision)
    seconds = time.monotonic() - started
    log.info("dataset %s %s in %.1f s: %s", snapshot_id, "reused" if reused else "built", seconds,
             "; ".join(decision.reasons + decision.warnings))
    return BuildResult(snapshot, decision, reused, seconds)


WHITESPACE = r"[\s\x{0B}\x{85}\p{Z}]"
"""Unicode White_Space (RE2's class of ASCII spaces plus U+000B, U+0085 and the separators)."""
NOT_A_SPACE = r"[\t\n\x{0B}\f\r\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}]"
"""White_Space other than U+0020."""


def normalize_prompts(prompts: pa.Array) -> pa.Array:
    """The text two prompts must share to be the same prompt: NFKC (full-width letters, ligatures, the
    non-breaking space), every run of Unicode whitespace as one space, trimmed, lower case. Vectorised in
    Arrow: one call per batch of distinct prompts. Only what changes is matched (a run of two or more, or one
    character that is not a plain space): matching every single space too made this the build's slowest
    step (833k distinct prompts: 4.0 s against 0.36 s)."""
    text = pc.utf8_normalize(prompts, "NFKC")
    text = pc.replace_substring_regex(text, f"{WHITESPACE}{{2,}}|{NOT_A_SPACE}", " ")
    return pc.utf8_lower(pc.utf8_trim_whitespace(text))


def _counts(con: Any, model_version: str) -> dict[str, int]:
    row = con.execute("""
        SELECT (SELECT count(*) FROM scoped),
               (SELECT count(*) FROM scoped WHERE model_version <> $1),
               (SELECT count(DISTINCT model_version) FROM scoped WHERE model_version <> $1),
               coalesce(sum(events), 0),
               coalesce(sum(events - CASE WHEN conflict THEN 2 ELSE 1 END), 0),
               count(*),
               count(*) FILTER (WHERE conflict),
               count(DISTINCT prompt_key),
               count(DISTINCT prompt_key) FILTER (WHERE is_eval),
               count(*) FILTER (WHERE NOT conflict AND NOT is_eval AND label),
               count(*) FILTER (WHERE NOT conflict AND NOT is_eval AND NOT label),
               count(*) FILTER (WHERE NOT conflict AND is_eval AND label),
               count(*) FILTER (WHERE NOT conflict AND is_eval AND NOT label)
        FROM units""", [model_version]).fetchone()
    names = ("events_in_window", "excluded_other_versions", "other_versions", "events_of_version",
             "duplicates_collapsed", "answers", "conflicts", "prompts", "prompts_eval",
             "kto_train_desirable", "kto_train_undesirable", "kto_eval_desirable", "kto_eval_undesirable")
    counts = {name: int(value) for name, value in zip(names, row)}
    pairs = con.execute("SELECT count(*) FILTER (WHERE NOT is_eval), count(*) FILTER (WHERE is_eval), "
                        "count(DISTINCT prompt_key) FROM pairs").fetchone()
    counts.update(pairs_train=int(pairs[0]), pairs_eval=int(pairs[1]), prompts_with_pairs=int(pairs[2]))
    return counts


def _copy(con: Any, sql: str, path: Path) -> None:
    con.execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")


def _watermark(con: Any) -> dict[str, Any]:
    offsets = con.execute("SELECT kafka_topic, kafka_partition, next_offset FROM kafka_offsets "
                          "ORDER BY ALL").fetchall()
    max_ingested = con.execute("SELECT max(ingested_at) FROM feedback").fetchone()[0]
    return {"offsets": [{"topic": t, "partition": p, "next_offset": o} for t, p, o in offsets],
            "max_ingested_at": max_ingested.isoformat() if max_ingested else None}


def _content_hash(con: Any) -> str:
    """sha256 of an order-independent fingerprint of the answers in each file: (prompt key, response hash,
    label, truncated, hash of the prompt text written) for KTO, (prompt key, chosen hash, rejected hash) for
    pairs, XOR-ed over rows under two hash seeds.

    DuckDB's parallel aggregation does not fix row order and hashing the text again would cost as much as
    the build, so the identity of each row is hashed, not its bytes. A snapshot id's files and manifest are
    written once: a rebuild of the same content reuses them (its counts, weights and watermark are the
    first build's).
    """
    digest = hashlib.sha256(f"snapshot format {SNAPSHOT_FORMAT};".encode())
    for split, is_eval in SPLITS:
        for name, cols, table, where in (("kto", "prompt_key, response_hash, label, truncated, prompt_hash", "units",
                                          "NOT conflict AND "),
                                         ("pairs", "prompt_key, chosen_hash, rejected_hash", "pairs", "")):
            row = con.execute(f"SELECT count(*), bit_xor(hash({cols})), bit_xor(hash({cols}, 'second seed')) "
                              f"FROM {table} WHERE {where}is_eval = {is_eval}").fetchone()
            digest.update(f"{name}_{split}:{row[0]}:{row[1]}:{row[2]};".encode())
    return digest.hexdigest()


def _record(store: Store, snapshot: Snapshot, path: Path) -> None:
    m = snapshot.manifest
    with store.writer() as con:
        con.execute(
            "INSERT INTO datasets (snapshot_id, content_sha256, model_version, path, counts, kto_weights, params, "
            "watermark, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, current_timestamp) "
            "ON CONFLICT (snapshot_id) DO NOTHING",
            [m.snapshot_id, m.content_sha256, m.model_version, str(path), json.dumps(m.counts),
             json.dumps(m.kto_weights), json.dumps(m.params, default=str), json.dumps(m.watermark)],
        )


def record_decision(store: Store, decision: Decision) -> None:
    """Keep a decision under (snapshot, settings key); the same key always holds the same decision (it is a
    pure function of the snapshot's counts and the settings), so the first row stands."""
    with store.writer() as con:
        con.execute("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, current_timestamp) "
                    "ON CONFLICT (snapshot_id, decision_key) DO NOTHING",
                    [decision.snapshot_id, decision.key, decision.method, decision.train,
                     json.dumps(decision.to_dict())])


def decisions_of(store: Store, snapshot_id: str) -> list[Decision]:
    """Every decision recorded about a snapshot, the latest first."""
    with store.reader() as con:
        rows = con.execute("SELECT decision FROM decisions WHERE snapshot_id = ? ORDER BY decided_at DESC",
                           [snapshot_id]).fetchall()
    return [Decision.from_dict(json.loads(row[0])) for row in rows]


def list_datasets(store: Store) -> Any:
    """Snapshots, the latest first, with the method of the latest decision about each."""
    return store.read("SELECT d.snapshot_id, d.model_version, d.created_at, d.counts->>'kto_train_desirable' AS up, "
                      "d.counts->>'kto_train_undesirable' AS down, d.counts->>'pairs_train' AS pairs, "
                      "(SELECT c.method FROM decisions c WHERE c.snapshot_id = d.snapshot_id "
                      " ORDER BY c.decided_at DESC LIMIT 1) AS method FROM datasets d ORDER BY d.created_at DESC")
