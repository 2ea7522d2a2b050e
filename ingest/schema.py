"""The feedback event: a typed record validated at the edge, so the landing only ever sees valid events.

Example message (JSON, UTF-8)::

    {"event_id": "c0ffee-42", "prompt": "How do I boil an egg?", "response": "Put it in boiling water...",
     "label": "up", "model_version": "smollm2-135m-instruct-q4_1", "event_time": "2026-11-28T12:00:00Z",
     "prompt_id": "p-981", "conversation_id": "conv-7", "user_id": "u-1", "source": "web",
     "truncated": false, "metadata": {"latency_ms": 420}}

``label`` accepts true/false, 1/0, "up"/"down", "thumbs_up"/"thumbs_down" (case-insensitive).
``event_time`` accepts RFC 3339 text (naive means UTC) or Unix epoch seconds. ``truncated`` (optional) is
true when the serving stack cut the answer off at its token limit (``finish_reason == "length"`` in
OpenAI-compatible APIs): training then scores the answer without an end-of-turn token, which the model never
produced. Unknown fields are ignored.
Decoding uses msgspec: one C pass validates types and size limits, ~1 µs per event.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec

from ktoloop.config import IngestConfig

UTC = dt.timezone.utc

LABELS: dict[Any, bool] = {
    True: True, False: False,  # 1 and 0 hash like True and False
    "up": True, "down": False, "thumbs_up": True, "thumbs_down": False,
    "true": True, "false": False, "1": True, "0": False,
}
LABEL_HELP = 'true/false, 1/0, "up"/"down" or "thumbs_up"/"thumbs_down"'

# Columns of a validated batch: the ``feedback`` table's event columns (the table adds the Kafka position).
EVENT_COLUMNS = ("event_id", "prompt", "response", "label", "model_version", "event_time",
                 "prompt_id", "conversation_id", "user_id", "source", "metadata", "truncated")


class InvalidEvent(ValueError):
    """The message cannot become a feedback event; the text names the field and the problem."""


# Required text fields: min_length=1 lets "   " through, so the decoder also refuses all-whitespace values.
REQUIRED_TEXT = ("event_id", "prompt", "response", "model_version")


def _undecodable(raw: bytes, exc: Exception) -> InvalidEvent:
    """Name invalid UTF-8 as such, whatever exception type the msgspec version at hand raises for it.

    Only failed messages pay for the explicit UTF-8 check; valid ones are decoded once, by msgspec.
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidEvent(f"not valid UTF-8: {bad.reason} at byte {bad.start}")
    return InvalidEvent(f"not valid JSON: {exc}")


class FeedbackEvent(msgspec.Struct, frozen=True):
    """A validated event. (A msgspec Struct: ~5x cheaper to build than a dataclass on the hot path.)"""

    event_id: str
    prompt: str
    response: str
    label: bool
    model_version: str
    event_time: dt.datetime
    prompt_id: str | None = None
    conversation_id: str | None = None
    user_id: str | None = None
    source: str | None = None
    metadata: str | None = None
    """The metadata object re-encoded as compact JSON text."""
    truncated: bool | None = None
    """True: cut off at the serving token limit; None: not reported (taken as ended by the model)."""


def _wire_struct(limits: IngestConfig) -> type[msgspec.Struct]:
    """The wire format with the configured size limits baked in, so msgspec enforces them while decoding."""
    text = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_text_chars)]
    ident = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_id_chars)]
    return msgspec.defstruct(
        "FeedbackWire",
        [
            ("event_id", ident),
            ("prompt", text),
            ("response", text),
            ("label", bool | int | str),
            ("model_version", ident),
            ("event_time", dt.datetime | int | float),
            ("prompt_id", ident | None, None),
            ("conversation_id", ident | None, None),
            ("user_id", ident | None, None),
            ("source", ident | None, None),
            ("metadata", dict[str, Any] | None, None),
            ("truncated", bool | None, None),
        ],
    )


class EventDecoder:
    """Bytes -> FeedbackEvent, or InvalidEvent with a reason. Never raises anything else on content."""

    def __init__(self, limits: IngestConfig | None = None) -> None:
        self.limits = limits or IngestConfig()
        self._decode = msgspec.json.Decoder(_wire_struct(self.limits)).decode
        self._encode = msgspec.json.Encoder().encode

    def decode(self, raw: bytes | None) -> FeedbackEvent:
        limits = self.limits
        if raw is None:
            raise InvalidEvent("empty message (null value)")
        if len(raw) > limits.max_message_bytes:
            raise InvalidEvent(f"message is {len(raw)} bytes, over the {limits.max_message_bytes}-byte limit")
        try:
            wire = self._decode(raw)
        except msgspec.ValidationError as exc:
            raise InvalidEvent(f"invalid field: {exc}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec 0.22 raised the latter for bad UTF-8
            raise _undecodable(raw, exc) from None
        # isspace() == blank after str.strip(), and stops at the first non-space: ~30 ns a field
        if wire.response.isspace() or wire.prompt.isspace() or wire.event_id.isspace() or wire.model_version.isspace():
            name = next(n for n in REQUIRED_TEXT if getattr(wire, n).isspace())
            raise InvalidEvent(f"invalid field: {name} is blank (only whitespace); a required text field "
                               f"needs a non-whitespace character - at `$.{name}`")
        return FeedbackEvent(
            event_id=wire.event_id,
            prompt=wire.prompt,
            response=wire.response,
            label=self._label(wire.label),
            model_version=wire.model_version,
            event_time=self._time(wire.event_time),
            prompt_id=wire.prompt_id,
            conversation_id=wire.conversation_id,
            user_id=wire.user_id,
            source=wire.source,
            metadata=self._metadata(wire.metadata),
            truncated=wire.truncated,
        )

    @staticmethod
    def _label(value: bool | int | str) -> bool:
        key = value.strip().lower() if isinstance(value, str) else value
        try:
            return LABELS[key]
        except KeyError:
            raise InvalidEvent(f"invalid field: label {value!r} is not one of {LABEL_HELP} - at `$.label`") from None

    @staticmethod
    def _time(value: dt.datetime | int | float) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        try:
            return dt.datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise InvalidEvent(f"invalid field: event_time {value!r} is not a valid epoch - at `$.event_time`") from None

    def _metadata(self, value: dict[str, Any] | None) -> str | None:
        if value is None:
            return None
        text = self._encode(value)
        if len(text) > self.limits.max_metadata_bytes:
            raise InvalidEvent(f"invalid field: metadata is {len(text)} bytes encoded, over the "
                               f"{self.limits.max_metadata_bytes}-byte limit - at `$.metadata`")
        return text.decode()


def encode_event(event: dict[str, Any]) -> bytes:
    """Serialise an event dict for publishing (datetimes as RFC 3339)."""
    return msgspec.json.encode(event)
