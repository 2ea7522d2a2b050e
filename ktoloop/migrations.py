"""Forward-only schema migrations for the DuckDB file: (version, name, SQL). Append; never edit a landed one.

Version numbers are reserved per stage so work can proceed in parallel:
1 ingestion, 2 datasets, 3 evaluations, 4 model registry, 5+ later. A stage's follow-up migrations take
its own hundreds (101, 102... ingestion; 201... datasets), so parallel branches never pick the same number.
"""

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "ingestion", """
        CREATE TABLE feedback (
            event_id        VARCHAR PRIMARY KEY,
            prompt          VARCHAR NOT NULL,
            response        VARCHAR NOT NULL,
            label           BOOLEAN NOT NULL,          -- true = thumbs up (desirable)
            model_version   VARCHAR NOT NULL,          -- the checkpoint that produced the response
            event_time      TIMESTAMPTZ NOT NULL,
            prompt_id       VARCHAR,
            conversation_id VARCHAR,
            user_id         VARCHAR,
            source          VARCHAR,
            metadata        JSON,
            kafka_topic     VARCHAR NOT NULL,
            kafka_partition INTEGER NOT NULL,
            kafka_offset    BIGINT NOT NULL,
            ingested_at     TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE dead_letters (
            kafka_topic     VARCHAR NOT NULL,
            kafka_partition INTEGER NOT NULL,
            kafka_offset    BIGINT NOT NULL,
            raw             BLOB,
            error           VARCHAR NOT NULL,
            received_at     TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
        );
        -- the landing's source of truth for where to resume (Kafka's committed offsets are for lag only)
        CREATE TABLE kafka_offsets (
            consumer_group  VARCHAR NOT NULL,
            kafka_topic     VARCHAR NOT NULL,
            kafka_partition INTEGER NOT NULL,
            next_offset     BIGINT NOT NULL,
            updated_at      TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (consumer_group, kafka_topic, kafka_partition)
        );
        -- per-flush counters, for rates and the rejection rate the monitor reports
        CREATE TABLE ingest_batches (
            consumer_group  VARCHAR NOT NULL,
            landed          INTEGER NOT NULL,
            duplicates      INTEGER NOT NULL,
            rejected        INTEGER NOT NULL,
            flushed_at      TIMESTAMPTZ NOT NULL
        );
    """),
    (2, "datasets", """
        -- one row per snapshot; the files and manifest live under <home>/snapshots/<snapshot_id>/
        CREATE TABLE datasets (
            snapshot_id     VARCHAR PRIMARY KEY,     -- ds-<first 12 hex of content_sha256>
            content_sha256  VARCHAR NOT NULL,
            model_version   VARCHAR NOT NULL,
            path            VARCHAR NOT NULL,
            counts          JSON NOT NULL,
            decision        JSON NOT NULL,           -- the method decision with its reasons
            kto_weights     JSON NOT NULL,
            params          JSON NOT NULL,
            watermark       JSON NOT NULL,           -- Kafka offsets and max(ingested_at) when it was read
            created_at      TIMESTAMPTZ NOT NULL
        );
    """),
    (3, "evaluations", """
        -- one row per (run, benchmark, metric): what dashboards and model comparisons read
        CREATE TABLE evaluations (
            run_id        VARCHAR NOT NULL,
            model_id      VARCHAR NOT NULL,
            adapter       VARCHAR,                 -- peft adapter directory, NULL for a base model
            suite         VARCHAR NOT NULL,        -- quick | full
            benchmark     VARCHAR NOT NULL,
            metric        VARCHAR NOT NULL,
            value         DOUBLE NOT NULL,
            n             INTEGER NOT NULL,
            stderr        DOUBLE,
            evaluated_at  TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (run_id, benchmark, metric)
        );
        -- per-item scores, so a candidate and a reference can be compared on the same items (paired check)
        CREATE TABLE evaluation_items (
            run_id        VARCHAR NOT NULL,
            benchmark     VARCHAR NOT NULL,
            metric        VARCHAR NOT NULL,
            item_id       INTEGER NOT NULL,
            value         DOUBLE NOT NULL,
            PRIMARY KEY (run_id, benchmark, metric, item_id)
        );
    """),
    (4, "model registry", """
        -- every candidate with its lineage; status: candidate | evaluated | canary | promoted | rejected | retired
        CREATE TABLE models (
            model_id          VARCHAR PRIMARY KEY,
            method            VARCHAR NOT NULL,
            snapshot_id       VARCHAR NOT NULL,
            snapshot_sha256   VARCHAR NOT NULL,
            reference_name    VARCHAR NOT NULL,
            reference_sha256  VARCHAR NOT NULL,
            model_version     VARCHAR NOT NULL,
            adapter_path      VARCHAR NOT NULL,
            config            JSON NOT NULL,
            metrics           JSON NOT NULL,           -- held-out preference score, training metrics
            evaluation        JSON,                    -- capability check and gate numbers
            status            VARCHAR NOT NULL,
            created_at        TIMESTAMPTZ NOT NULL
        );
        -- the promoted pointer is the newest row; the rest is its history
        CREATE TABLE promotions (
            seq          BIGINT PRIMARY KEY,
            model_id     VARCHAR,                      -- NULL: back to the bare reference
            action       VARCHAR NOT NULL,             -- promote | rollback | reject
            forced       BOOLEAN NOT NULL,
            actor        VARCHAR NOT NULL,
            reason       VARCHAR NOT NULL,
            gate         JSON,
            changed_at   TIMESTAMPTZ NOT NULL
        );
    """),
    (101, "ingestion: bounded dead letters", """
        -- raw keeps at most the first [ingest] dead_letter_max_bytes of a message; these describe all of it
        ALTER TABLE dead_letters ADD COLUMN raw_size BIGINT;       -- bytes of the whole message (NULL: null value)
        ALTER TABLE dead_letters ADD COLUMN raw_sha256 VARCHAR;    -- hex sha256 of the whole message
        UPDATE dead_letters SET raw_size = octet_length(raw), raw_sha256 = sha256(raw) WHERE raw IS NOT NULL;
    """),
    (102, "ingestion: truncated answers", """
        -- true: the serving stack cut the answer off at its token limit; NULL: not reported (taken as ended)
        ALTER TABLE feedback ADD COLUMN truncated BOOLEAN;
    """),
    (201, "datasets: decisions in their own table", """
        -- a snapshot is immutable data; what the rules decided about it depends on their settings too, so
        -- one row per (snapshot, settings): ktoloop.decision.decision_key hashes the gates, the forced method
        -- and whether a reward model existed
        CREATE TABLE decisions (
            snapshot_id   VARCHAR NOT NULL,
            decision_key  VARCHAR NOT NULL,
            method        VARCHAR,                 -- NULL: no training
            train         BOOLEAN NOT NULL,
            decision      JSON NOT NULL,           -- ktoloop.decision.Decision, reasons and thresholds included
            decided_at    TIMESTAMPTZ NOT NULL,    -- the first time it was reached
            PRIMARY KEY (snapshot_id, decision_key)
        );
        INSERT INTO decisions
            SELECT snapshot_id, 'before-201', decision->>'method', coalesce((decision->>'train')::BOOLEAN, false),
                   decision, created_at
            FROM datasets;
        ALTER TABLE datasets DROP COLUMN decision;
    """),
]
