import datetime as dt
import json

import pytest

from ingest.schema import EventDecoder, InvalidEvent
from ktoloop.config import IngestConfig

GOOD = {"event_id": "e1", "prompt": "hi", "response": "hello", "label": "up", "model_version": "m1",
        "event_time": "2026-11-28T12:00:00Z"}


def raw(**changes):
    event = {**GOOD, **changes}
    return json.dumps({k: v for k, v in event.items() if v is not ...}).encode()


@pytest.mark.parametrize("label,expected", [
    (True, True), (False, False), (1, True), (0, False), ("up", True), ("down", False),
    ("thumbs_up", True), ("thumbs_down", False), ("UP", True), ("true", True), ("false", False),
])
def test_label_forms(label, expected):
    assert EventDecoder().decode(raw(label=label)).label is expected


@pytest.mark.parametrize("changes,reason", [
    ({"label": "meh"}, r"label 'meh' is not one of"),
    ({"label": 2}, r"label 2 is not one of"),
    ({"event_id": ...}, r"missing required field `event_id`"),
    ({"response": ""}, r"length >= 1 - at `\$.response`"),
    ({"response": ...}, r"missing required field `response`"),
    ({"model_version": ...}, r"missing required field `model_version`"),
    ({"prompt": 5}, r"Expected `str`, got `int` - at `\$.prompt`"),
    ({"metadata": [1, 2]}, r"at `\$.metadata`"),
    ({"truncated": "yes"}, r"Expected `bool \| null`, got `str` - at `\$.truncated`"),
    ({"event_time": "yesterday"}, r"at `\$.event_time`"),
    ({"prompt": "x" * 101}, r"length <= 100 - at `\$.prompt`"),
])
def test_rejections_name_the_field(changes, reason):
    with pytest.raises(InvalidEvent, match=reason):
        EventDecoder(IngestConfig(max_text_chars=100)).decode(raw(**changes))


def test_not_json_not_utf8_oversize_null():
    decoder = EventDecoder(IngestConfig(max_message_bytes=300))
    with pytest.raises(InvalidEvent, match="not valid JSON"):
        decoder.decode(b"{oops")
    with pytest.raises(InvalidEvent, match="not valid UTF-8"):
        decoder.decode(raw(prompt="caf\udce9").replace(b"\\udce9", b"\xe9"))
    with pytest.raises(InvalidEvent, match="over the 300-byte limit"):
        decoder.decode(raw(prompt="y" * 400))
    with pytest.raises(InvalidEvent, match="null value"):
        decoder.decode(None)


def test_invalid_utf8_is_named_with_its_byte_whatever_msgspec_raises():
    message = raw(prompt="caf\udce9").replace(b"\\udce9", b"\xe9")
    position = message.index(b"\xe9")
    with pytest.raises(InvalidEvent, match=rf"^not valid UTF-8: invalid continuation byte at byte {position}$"):
        EventDecoder().decode(message)
    with pytest.raises(InvalidEvent, match=r"^not valid UTF-8: invalid start byte"):
        EventDecoder().decode(b"\xff{oops")  # both broken: the encoding is named first
    with pytest.raises(InvalidEvent, match=r"^not valid JSON: "):
        EventDecoder().decode("{\"prompt\": \"café\"".encode())  # valid UTF-8, truncated JSON


@pytest.mark.parametrize("field", ["event_id", "prompt", "response", "model_version"])
@pytest.mark.parametrize("blank", ["   ", "\t\n", "\u3000\u00a0\u2028"])
def test_blank_required_text_is_rejected_naming_the_field(field, blank):
    with pytest.raises(InvalidEvent, match=rf"{field} is blank \(only whitespace\).* - at `\$\.{field}`"):
        EventDecoder().decode(raw(**{field: blank}))


def test_text_with_surrounding_whitespace_lands_unchanged():
    event = EventDecoder().decode(raw(response="  ok\n", prompt="\u3000hi"))
    assert (event.response, event.prompt) == ("  ok\n", "\u3000hi")


def test_truncated_is_optional_and_reported_as_given():
    decoder = EventDecoder()
    assert [decoder.decode(raw(**c)).truncated for c in ({}, {"truncated": True}, {"truncated": False})] == [
        None, True, False]


def test_metadata_limit_and_times():
    decoder = EventDecoder(IngestConfig(max_metadata_bytes=20))
    with pytest.raises(InvalidEvent, match="metadata is .* over the 20-byte limit"):
        decoder.decode(raw(metadata={"k": "v" * 30}))
    event = decoder.decode(raw(metadata={"k": 1}, event_time=1_700_000_000))
    assert event.metadata == '{"k":1}'
    assert event.event_time == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.timezone.utc)
    naive = decoder.decode(raw(event_time="2026-01-01T00:00:00"))
    assert naive.event_time.tzinfo is not None and naive.event_time.hour == 0
