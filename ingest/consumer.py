"""The feedback consumer: poll, validate at the edge, land micro-batches in DuckDB, then commit to Kafka.

Exactly once comes from DuckDB, not Kafka: each batch lands in one transaction together with the next
offset per partition, and on every partition assignment the consumer seeks to those stored offsets.
Kafka commits follow the landing and only serve lag monitoring. Bad messages go to ``dead_letters``
with the reason; nothing in a message's content can crash the loop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from ingest import clients
from ingest.landing import Batch, land, stored_offsets
from ingest.schema import EventDecoder, InvalidEvent
from ktoloop.config import Settings
from ktoloop.errors import TransientError
from ktoloop.store import Store

log = logging.getLogger(__name__)


class NoPartitionsAssigned(TransientError):
    """A drain that never joined: retry once the group has settled; never report it as drained."""


@dataclass
class IngestStats:
    consumed: int = 0
    landed: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0
    """From the first record received to the end: the landing rate without the group join."""

    @property
    def rate(self) -> float:
        return self.consumed / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"consumed {self.consumed}, landed {self.landed}, duplicates {self.duplicates}, "
                f"rejected {self.rejected} in {self.batches} batches, {self.seconds:.1f} s ({self.rate:,.0f} msg/s)")


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    """On assignment, resume from DuckDB's offsets; on revocation, drop unflushed records of lost partitions.

    Runs inside ``poll()``: it seeks and reads DuckDB, but never commits (kafka-python 3 forbids a blocking
    commit here, and the next owner resumes from DuckDB anyway).
    """

    def __init__(self, ingestor: FeedbackIngestor) -> None:
        self.ingestor = ingestor

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.ingestor._forget(revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.ingestor._seek(assigned)


class FeedbackIngestor:
    """``run()`` until stopped, or ``drain()`` until the group has no lag."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.kafka = settings.kafka
        self.limits = settings.ingest
        self.store = store or Store(settings.db_path, settings.store.lock_timeout_s)
        self.decoder = EventDecoder(self.limits)
        self.stop_requested = threading.Event()
        self.stats = IngestStats()
        self._pending: list = []  # ConsumerRecords not yet handed to the writer
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None
        self._consumer = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        """Finish the current batch, land and commit it, then return (wired to SIGTERM/SIGINT)."""
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> IngestStats:
        return self._loop(until_caught_up=False)

    def drain(self, join_timeout_s: float | None = None) -> IngestStats:
        """Raises NoPartitionsAssigned when the group gives this consumer nothing to read within the wait
        (``[ingest] drain_join_timeout_s`` by default): a scheduled drain that never joined did not drain."""
        timeout = self.limits.drain_join_timeout_s if join_timeout_s is None else join_timeout_s
        return self._loop(until_caught_up=True, join_timeout_s=timeout)

    # -- the loop --------------------------------------------------------------------------------------
    def _loop(self, until_caught_up: bool, join_timeout_s: float = 60.0) -> IngestStats:
        # The broker first: an unreachable one fails naming its address before the DuckDB file is created
        # or migrated (a wrong bootstrap address must not leave an empty store behind).
        clients.ensure_topic(self.kafka)
        consumer = self._consumer = clients.consumer(self.kafka)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktoloop-landing")
        started = time.monotonic()
        next_progress = started + self.limits.progress_every_s
        batch_started = started
        first_record_at: float | None = None
        try:
            self.store.init()
            consumer.subscribe([self.kafka.topic], listener=_SeekToStoredOffsets(self))
            while not self.stop_requested.is_set():
                records = consumer.poll(timeout_ms=200, max_records=self.limits.batch_max_events)
                polled = 0
                for messages in records.values():
                    self._pending.extend(messages)
                    polled += len(messages)
                now = time.monotonic()
                if polled and first_record_at is None:
                    first_record_at = now
                if len(self._pending) >= self.limits.batch_max_events or (
                    self._pending and now - batch_started >= self.limits.batch_max_seconds
                ):
                    self._flush()
                    batch_started = now
                if now >= next_progress:
                    self._progress(started)
                    next_progress = now + self.limits.progress_every_s
                if until_caught_up and polled == 0:
                    if not consumer.assignment():
                        if now - started > join_timeout_s:
                            raise NoPartitionsAssigned(
                                f"drain got no partition of topic {self.kafka.topic!r} from group "
                                f"{self.kafka.group_id!r} at {self.kafka.bootstrap_servers} within "
                                f"{join_timeout_s:g} s, so nothing was drained: another member of the group "
                                "may hold them all (is `ktoloop ingest run` running?); stop it, wait for the "
                                "group to settle, or raise [ingest] drain_join_timeout_s")
                        continue
                    if self._caught_up():
                        break
            self._flush()
            self._await_landing()
        finally:
            ended = time.monotonic()
            self.stats.seconds = ended - started
            self.stats.busy_seconds = ended - (first_record_at or ended)
            self._writer.shutdown(wait=True)
            consumer.close(autocommit=False)
            self._consumer = None
        log.info("ingest finished: %s", self.stats)
        return self.stats

    # -- landing: one batch in flight on the writer thread while the next one is polled ----------------
    def _flush(self) -> None:
        """Hand the pending records to the writer thread (after the previous batch has landed)."""
        if not self._pending:
            return
        self._await_landing()
        records, self._pending = self._pending, []
        self._in_flight = self._writer.submit(self._decode_and_land, records)

    def _await_landing(self, commit: bool = True) -> None:
        """Wait for the batch in flight to land, then commit its offsets to Kafka (from the polling thread:
        kafka-python clients are not thread-safe). A landing error is re-raised here."""
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        next_offsets = future.result()
        if not commit:
            return
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()}
        try:
            self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:  # lag display only; DuckDB already holds the truth
            log.warning("Kafka offset commit failed (landing is unaffected): %s", exc)

    def _decode_and_land(self, records: list) -> dict[tuple[str, int], int]:
        """Validate each record at the edge, then land the batch and its offsets in one transaction.

        Runs on the writer thread; DuckDB releases the GIL, so the write overlaps the next poll.
        """
        batch = Batch()
        for record in records:
            try:
                batch.events.append(self.decoder.decode(record.value))
                batch.positions.append((record.topic, record.partition, record.offset))
                batch.payloads.append(record.value)
            except InvalidEvent as exc:
                batch.rejects.append((record.topic, record.partition, record.offset, record.value, str(exc)))
            key = (record.topic, record.partition)
            batch.next_offsets[key] = max(batch.next_offsets.get(key, 0), record.offset + 1)
        result = land(self.store, self.kafka.group_id, batch, self.limits.dead_letter_max_bytes)
        self.stats.consumed += len(batch)
        self.stats.landed += result.landed
        self.stats.duplicates += result.duplicates
        self.stats.rejected += result.rejected
        self.stats.batches += 1
        return batch.next_offsets

    def _caught_up(self) -> bool:
        """No lag on any assigned partition. (Tansu under-reports end offsets, so a quiet poll is also needed.)"""
        consumer = self._consumer
        assigned = list(consumer.assignment())
        ends = consumer.end_offsets(assigned)
        return all(consumer.position(tp) >= ends[tp] for tp in assigned)

    def _lag(self) -> int:
        consumer = self._consumer
        assigned = list(consumer.assignment())
        if not assigned:
            return 0
        ends = consumer.end_offsets(assigned)
        return sum(max(0, ends[tp] - consumer.position(tp)) for tp in assigned)

    def _progress(self, started: float) -> None:
        elapsed = time.monotonic() - started
        log.info("ingest: %.0f msg/s, lag %d, landed %d, duplicates %d, rejected %d",
                 self.stats.consumed / elapsed, self._lag(), self.stats.landed, self.stats.duplicates,
                 self.stats.rejected)

    # -- rebalance callbacks (inside poll) ------------------------------------------------------------
    def _seek(self, assigned: set[TopicPartition]) -> None:
        self._await_landing(commit=False)  # stored offsets must include the batch in flight; no commit in here
        stored = stored_offsets(self.store, self.kafka.group_id, self.kafka.topic)
        for tp in assigned:
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)  # DuckDB has nothing from it: start at the start
        log.info("assigned %s; resuming from DuckDB offsets %s",
                 sorted(tp.partition for tp in assigned), {p: stored.get(p) for p in sorted(stored)})

    def _forget(self, revoked: set[TopicPartition]) -> None:
        self._await_landing(commit=False)
        lost = {(tp.topic, tp.partition) for tp in revoked}
        self._pending = [r for r in self._pending if (r.topic, r.partition) not in lost]
