"""The incremental SSE parser: fields, line endings, and chunking at arbitrary byte boundaries."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.http.sse import Frame, SSEParser, parse_frame, parse_lines


def parse_whole(data: bytes) -> list[Frame]:
    parser = SSEParser()
    return parser.feed(data) + parser.close()


def test_single_data_frame() -> None:
    frames = SSEParser().feed(b'data: {"a":1}\n\n')
    assert frames == [Frame(b'data: {"a":1}\n\n', b'{"a":1}', None)]


def test_data_without_space_after_colon() -> None:
    assert parse_frame(b"data:x\n\n").data == b"x"


def test_only_one_leading_space_is_stripped() -> None:
    assert parse_frame(b"data:  x \n\n").data == b" x "


def test_event_field() -> None:
    frame = parse_frame(b"event: response.created\ndata: {}\n\n")
    assert frame.event == "response.created"
    assert frame.data == b"{}"


def test_multi_line_data_joined_with_newline() -> None:
    frame = parse_frame(b"data: line one\ndata: line two\ndata:\n\n")
    assert frame.data == b"line one\nline two\n"


def test_comment_only_frame_has_no_data() -> None:
    frame = parse_frame(b": keep-alive\n\n")
    assert frame.data is None
    assert frame.event is None
    assert frame.raw == b": keep-alive\n\n"


def test_comment_between_data_lines_is_ignored() -> None:
    assert parse_frame(b"data: a\n: hi\ndata: b\n\n").data == b"a\nb"


def test_field_without_colon() -> None:
    assert parse_frame(b"data\n\n").data == b""


def test_unknown_fields_are_ignored() -> None:
    frame = parse_frame(b"id: 7\nretry: 100\nfoo: bar\ndata: x\n\n")
    assert frame.data == b"x"
    assert frame.event is None


def test_done_frame() -> None:
    assert parse_frame(b"data: [DONE]\n\n").data == b"[DONE]"


def test_several_frames_in_one_chunk() -> None:
    stream = b"data: 1\n\n: ping\n\ndata: 2\n\ndata: [DONE]\n\n"
    frames = SSEParser().feed(stream)
    assert [f.raw for f in frames] == [b"data: 1\n\n", b": ping\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    assert [f.data for f in frames] == [b"1", None, b"2", b"[DONE]"]


def test_crlf_line_endings() -> None:
    stream = b"event: e\r\ndata: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n"
    frames = SSEParser().feed(stream)
    assert [f.raw for f in frames] == [b"event: e\r\ndata: a\r\ndata: b\r\n\r\n", b"data: c\r\n\r\n"]
    assert [(f.event, f.data) for f in frames] == [("e", b"a\nb"), (None, b"c")]


def test_cr_line_endings() -> None:
    frames = SSEParser().feed(b"data: a\rdata: b\r\rdata: c\r\r")
    # the last frame ends with a lone \r that might be half of \r\n: it waits for more bytes
    assert [f.data for f in frames] == [b"a\nb"]
    parser = SSEParser()
    frames = parser.feed(b"data: a\rdata: b\r\rdata: c\r\rdata: d")
    assert [f.data for f in frames] == [b"a\nb", b"c"]
    assert [f.raw for f in frames] == [b"data: a\rdata: b\r\r", b"data: c\r\r"]


def test_mixed_line_endings() -> None:
    frames = SSEParser().feed(b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\ndata: d\n\n")
    assert [f.data for f in frames] == [b"a", b"b", b"c", b"d"]
    assert b"".join(f.raw for f in frames) == b"data: a\r\n\ndata: b\n\r\ndata: c\r\r\ndata: d\n\n"


def test_split_between_cr_and_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r\n\r") == []
    assert parser.pending == b"data: a\r\n\r"
    frames = parser.feed(b"\ndata: b\r\n\r\n")
    assert [f.raw for f in frames] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_incomplete_frame_waits() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: {\"a\"") == []
    assert parser.feed(b":1}\n") == []
    frames = parser.feed(b"\n")
    assert [f.data for f in frames] == [b'{"a":1}']
    assert parser.pending == b""


def test_close_returns_unterminated_last_frame() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2") == [Frame(b"data: 1\n\n", b"1", None)]
    assert parser.close() == [Frame(b"data: 2", b"2", None)]
    assert parser.close() == []
    assert parser.pending == b""


def test_close_with_single_newline_terminated_frame() -> None:
    parser = SSEParser()
    parser.feed(b"data: x\n")
    assert parser.close() == [Frame(b"data: x\n", b"x", None)]


def test_close_on_whitespace_only_rest() -> None:
    parser = SSEParser()
    parser.feed(b"data: x\n\n\r")
    assert parser.close() == []


def test_utf8_split_across_chunks() -> None:
    payload = "data: héllo 🌍\n\n".encode()
    parser = SSEParser()
    frames: list[Frame] = []
    for i in range(len(payload)):
        frames += parser.feed(payload[i : i + 1])
    assert frames == [Frame(payload, "héllo 🌍".encode(), None)]


# --- property: chunking never changes the result ---------------------------------------------

line_endings = st.sampled_from([b"\n", b"\r\n", b"\r"])
# field values: no line-ending characters inside one line
values = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
# (line, field, value): what a parser must make of each line
Line = tuple[bytes, str | None, bytes]
typed_lines: st.SearchStrategy[Line] = st.one_of(
    values.map(lambda v: (b"data: " + v, "data", v)),
    values.filter(lambda v: not v.startswith(b" ")).map(lambda v: (b"data:" + v, "data", v)),
    values.map(lambda v: (b"event: " + v, "event", v)),
    values.map(lambda v: (b": " + v, None, b"")),
    st.just((b"data", "data", b"")),
    st.just((b"data: [DONE]", "data", b"[DONE]")),
)
lines = typed_lines.map(lambda t: t[0])


@st.composite
def frames_with_fields(draw: st.DrawFn) -> tuple[bytes, bytes | None, str | None]:
    body = draw(st.lists(st.tuples(typed_lines, line_endings), min_size=1, max_size=4))
    # the blank line that ends the frame; after a lone \r a \n would only complete that line ending
    last = body[-1][1]
    blank = draw(st.sampled_from([b"\r\n", b"\r"] if last == b"\r" else [b"\n", b"\r\n", b"\r"]))
    raw = b"".join(line + end for (line, _, _), end in body) + blank
    data = [value for (_, field, value), _ in body if field == "data"]
    events = [value.decode("utf-8", "replace") for (_, field, value), _ in body if field == "event"]
    return raw, b"\n".join(data) if data else None, events[-1] if events else None


def frame_bytes() -> st.SearchStrategy[bytes]:
    return frames_with_fields().map(lambda t: t[0])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    frames = draw(st.lists(frame_bytes(), max_size=6))
    tail = draw(st.one_of(st.just(b""), lines))
    data = b"".join(frames) + tail
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    return data, cuts


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=500)
@given(streams())
def test_chunking_yields_the_same_frames(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    whole = parse_whole(data)
    parser = SSEParser()
    chunked: list[Frame] = []
    for chunk in split(data, cuts):
        chunked += parser.feed(chunk)
    chunked += parser.close()
    assert chunked == whole
    assert [(f.raw, f.data, f.event) for f in chunked] == [(f.raw, f.data, f.event) for f in whole]


@settings(max_examples=300)
@given(streams())
def test_raw_bytes_concatenate_to_the_input(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    parser = SSEParser()
    raws: list[bytes] = []
    for chunk in split(data, cuts):
        raws += [f.raw for f in parser.feed(chunk)]
    rest = parser.pending
    raws += [f.raw for f in parser.close()]
    joined = b"".join(raws)
    # everything is accounted for, except trailing whitespace that close() does not turn into a frame
    assert data.startswith(joined)
    assert data[len(joined):].strip() == b""
    assert not rest.strip() or joined.endswith(rest)


@settings(max_examples=300)
@given(st.lists(frames_with_fields(), min_size=1, max_size=6))
def test_each_complete_frame_is_one_frame(expected: list[tuple[bytes, bytes | None, str | None]]) -> None:
    frames = [raw for raw, _, _ in expected]
    parser = SSEParser()
    parsed = parser.feed(b"".join(frames))
    if frames[-1].endswith(b"\r"):
        # the last lone \r may be half of a \r\n: that frame is only certain at the end of the stream
        assert [f.raw for f in parsed] == frames[:-1]
        parsed += parser.close()
    assert [(f.raw, f.data, f.event) for f in parsed] == expected


@settings(max_examples=500)
@given(st.one_of(frame_bytes(), st.binary(max_size=40), values.map(lambda v: b"data: " + v + b"\n\n")))
def test_the_one_data_line_fast_path_agrees_with_the_general_parse(raw: bytes) -> None:
    assert parse_frame(raw) == parse_lines(raw)
