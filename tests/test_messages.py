"""The wire format: any bytes give a Task or a clear MessageError, never a crash."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gleam import messages

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


def test_the_original_message_shape_decodes() -> None:
    task = messages.decode_task(b'{"Name": "config::sync", "Data": {"path": "/etc/app.conf"}}')
    assert task == messages.Task("config::sync", {"path": "/etc/app.conf"})


def test_missing_data_is_null() -> None:
    assert messages.decode_task('{"Name":"print"}') == messages.Task("print", None)


def test_encoding_is_canonical() -> None:
    a = messages.Task("print", {"b": 1, "a": [1, {"d": 2, "c": 3}]}).encode()
    assert a == b'{"Data":{"a":[1,{"c":3,"d":2}],"b":1},"Name":"print"}'


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"not json", "not JSON"),
        (b"null", "JSON null"),
        (b"[1,2]", "array"),
        (b'"print"', "string"),
        (b"{}", 'no "Name"'),
        (b'{"Name": 3}', "number, not a string"),
        (b'{"Name": null}', "null, not a string"),
        (b'{"Name": "../../etc/passwd"}', "invalid"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 200 levels"),
        (b'{"Name":"print","Data":"' + b"x" * messages.MAX_MESSAGE_BYTES + b'"}', "limit"),
        (b'{"Name":"t::echo","Data":' + b"1" * 5000 + b"}", "integer of more than 4300 digits"),
        (b'{"Name":"x","Data":-' + b"1" * 5000 + b"}", "integer of more than 4300 digits"),
        (b'{"Name":"x","Data":NaN}', "holds NaN, which is not JSON"),
        (b'{"Name":"x","Data":[-Infinity]}', "holds -Infinity"),
        (b'{"Name":"x","Data":1e999}', "the number 1e999, too large"),
        (b'{"Name":"x","Data":"\\ud800"}', "lone UTF-16 surrogate"),
        (b'{"Name":"x","Data":{"\\udfff":1}}', "lone UTF-16 surrogate"),
        (b'{"Name":"x","Data":"\xed\xa0\x80"}', "not UTF-8"),
        (b'{"Name":"x","Data":' + b"[" * 201 + b"]" * 201 + b"}", "nested deeper than 200"),
        (b'{"Name":"x","Data":' + b'{"a":' * 990 + b"1" + b"}" * 990 + b"}", "deeper than 200"),
    ],
)
def test_bad_messages_give_clear_errors(raw: bytes, error: str) -> None:
    with pytest.raises(messages.MessageError, match=error):
        messages.decode_task(raw)


@given(st.binary(max_size=200))
def test_any_bytes_give_a_task_or_a_message_error(raw: bytes) -> None:
    try:
        task = messages.decode_task(raw)
    except messages.MessageError as exc:
        assert str(exc)
    else:
        assert isinstance(task.name, str)


@given(json_values)
def test_any_json_value_gives_a_task_or_a_message_error(value: object) -> None:
    with contextlib.suppress(messages.MessageError):
        messages.decode_task(json.dumps(value))


@given(json_values)
def test_encode_then_decode_round_trips(data: object) -> None:
    task = messages.Task("a::b", data)
    assert messages.decode_task(task.encode()) == task
    assert messages.Task("a::b", data).encode() == task.encode()


def test_results_and_registrations_round_trip() -> None:
    result = messages.Result(
        agent="web-1", key="/gleam/node/web-1", revision=7, name="print", ok=False,
        result=None, error="boom", started="2026-11-28T22:00:00.000001Z", duration_ms=1.5,
        skipped=[5, 6],
    )  # fmt: skip
    assert messages.decode_result(result.encode()) == result
    info = messages.AgentInfo(
        "web-1", "host", 42, ["eu", "web"], "0.1.0", "2026-11-28T22:00:00Z", "/s"
    )
    assert messages.decode_agent_info(info.encode()) == info


def test_a_broken_result_record_is_a_message_error() -> None:
    with pytest.raises(messages.MessageError):
        messages.decode_result(b'{"agent": "a"}')


def test_data_nested_200_levels_decodes_and_encodes_back() -> None:
    raw = b'{"Data":' + b"[" * 200 + b"]" * 200 + b',"Name":"x"}'
    assert messages.decode_task(raw).encode() == raw


def test_an_escaped_backslash_before_u_is_no_surrogate() -> None:
    assert messages.decode_task(b'{"Name":"x","Data":"\\\\ud800"}').data == "\\ud800"


def test_a_text_message_with_a_lone_surrogate_is_a_message_error() -> None:
    with pytest.raises(messages.MessageError, match="surrogate"):
        messages.decode_task('{"Name":"x","Data":"\ud800"}')


def test_1_mib_of_tiny_tables_is_a_task() -> None:
    raw = b'{"Name":"print","Data":[' + b"{}," * 349_000 + b"{}]}"
    assert len(messages.decode_task(raw).data) == 349_001  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (float("nan"), "NaN or infinity"),
        ([float("inf")], "NaN or infinity"),
        ("\ud800", "surrogate"),
        (b"bytes", "not JSON-serialisable"),
        ({1: "a", "b": 2}, "not JSON-serialisable"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(data: object, error: str) -> None:
    with pytest.raises(messages.MessageError, match=error):
        messages.Task("x", data).encode()  # type: ignore[arg-type]


def test_encode_refuses_data_deeper_than_the_limit_and_data_that_holds_itself() -> None:
    deep: list[object] = []
    for _ in range(messages.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(messages.MessageError, match="nested deeper than 200 levels"):
        messages.Task("x", deep).encode()
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(messages.MessageError, match="holds itself"):
        messages.Task("x", loop).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"agent":"a","key":"k","revision":1,"ok":"false"}',
        b'{"agent":"a","key":"k","revision":1,"ok":true,"error":["x"]}',
        b'{"agent":"a","key":"k","revision":1,"ok":true,"name":{}}',
        b'{"agent":"a","key":"k","revision":1,"ok":true,"skipped":5}',
        b'{"agent":"a","key":"k","revision":1,"ok":true,"duration_ms":' + b"9" * 400 + b"}",
        b'{"agent":"a","key":"k","revision":' + b"1" * 5000 + b',"ok":true}',
        b'{"agent":"a","key":"k","revision":1,"ok":true,"result":' + b"[" * 900 + b"]" * 900 + b"}",
    ],
)
def test_a_result_record_with_a_bad_field_is_a_message_error(raw: bytes) -> None:
    with pytest.raises(messages.MessageError):
        messages.decode_result(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id":"a","regions":"eu"}',
        b'{"id":"a","pid":1e999}',
        b'{"id":"a","pid":"x"}',
        b'{"id":"a","hostname":"\\udc00"}',
    ],
)
def test_a_registration_with_a_bad_field_is_a_message_error(raw: bytes) -> None:
    with pytest.raises(messages.MessageError):
        messages.decode_agent_info(raw)
