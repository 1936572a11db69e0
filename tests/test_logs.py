"""One logging setup: one formatter, one line per record, the HTTP clients quiet unless asked."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import re
import select
import time
from collections.abc import Iterator

import pytest

from webhook import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup() configures the process's loggers: put back what pytest had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {name: logging.getLogger(name) for name in ("httpx", "httpcore", "uvicorn.error")}
    saved = {name: (lg.level, list(lg.handlers), lg.propagate) for name, lg in named.items()}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (lvl, hs, propagate) in saved.items():
        named[name].setLevel(lvl)
        named[name].handlers[:] = hs
        named[name].propagate = propagate


def emitted(fmt: str, level: str = "info", **options: bool) -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    logs.setup(level, fmt, stream=stream, **options)
    return stream, logging.getLogger("webhook.test")


def test_json_is_one_object_per_line_with_the_fields_merged() -> None:
    stream, log = emitted("json")
    log.error("config rejected:\n  - a\n  - b", extra={logs.FIELDS: {"uid": "1", "n": 2}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "config rejected:\n  - a\n  - b"
    assert (first["level"], first["logger"], first["uid"], first["n"]) == (
        "error",
        "webhook.test",
        "1",
        2,
    )
    assert first["time"].endswith("Z")
    assert "ValueError: boom" in second["exc"]


def test_text_is_one_line_per_record() -> None:
    stream, log = emitted("text")
    log.warning(
        "config rejected:\n  - a", extra={logs.FIELDS: {"images": ["a -> b", "c"], "dryRun": False}}
    )
    (line,) = stream.getvalue().splitlines()
    assert " WARNING webhook.test: config rejected:\\n  - a " in line
    assert line.endswith('images="a -> b, c" dryRun=false')


def test_http_clients_stay_at_warning_unless_asked() -> None:
    stream, _ = emitted("json")
    logging.getLogger("httpx").info("HTTP Request: GET https://r.example/v2/")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    logging.getLogger("uvicorn.error").error("Exception in ASGI application")
    (only,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert only["logger"] == "uvicorn" and only["level"] == "error"

    stream, _ = emitted("json", "debug")
    logging.getLogger("httpx").info("HTTP Request: GET https://r.example/v2/")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    assert [json.loads(line)["logger"] for line in stream.getvalue().splitlines()] == ["httpx"]

    stream, _ = emitted("json", "debug", http_trace=True)
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    assert json.loads(stream.getvalue())["logger"] == "httpcore.http11"


def test_third_party_text_is_scrubbed() -> None:
    stream, _ = emitted("json", "debug")
    logging.getLogger("httpx").info("GET https://bob:builder@r.example/token?password=builder")
    assert "builder" not in stream.getvalue()


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="verbose"):
        logs.setup("verbose", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="xml"):
        logs.setup("info", "xml", stream=io.StringIO())


def test_the_default_format_follows_the_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.default_format(Terminal()) == "text"
    assert logs.default_format(io.StringIO()) == "json"


def test_timestamps_follow_the_clock_across_seconds() -> None:
    formatter = logs.JsonFormatter()
    for created in (1700000000.001, 1700000000.999, 1700000001.5, 1699999999.25):
        record = logging.LogRecord("pinhook", logging.INFO, __file__, 1, "m", None, None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        expected += f".{int(record.msecs):03d}Z"
        assert json.loads(formatter.format(record))["time"] == expected


def test_the_time_now_is_a_records_time_now() -> None:
    """``now`` (each admission line's time, formatted once a millisecond) is what a record
    made at that moment would carry: between one made before and one made after."""
    timestamps = logs.JsonFormatter().timestamp

    def record_time() -> str:
        created = time.time()
        return timestamps(created, (created % 1) * 1000)

    for _ in range(2000):  # across many milliseconds, and within some
        before = record_time()
        now = timestamps.now()
        assert before <= now <= record_time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)


FIELDS = {"uid": "", "kind": "Pod", "durationMs": 0.0, "images": ['a "quoted" b', "c=d e"]}


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_line_is_what_the_formatter_writes_for_its_record(fmt: str) -> None:
    """Written whole the first time, from its cut afterwards: the same text either way."""
    stream, log = emitted(fmt)
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    for uid, ms in (("u-1", 1.25), ("u-2", 0.0), ('u"3', 12.5)):
        line.write(uid, ms)
        extra = {logs.FIELDS: {**FIELDS, "uid": uid, "durationMs": ms}}
        log.info("admission patched", extra=extra)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6
    for written, logged in zip(lines[::2], lines[1::2], strict=True):
        if fmt == "json":
            direct, through = json.loads(written), json.loads(logged)
            assert direct.pop("time").endswith("Z") and through.pop("time").endswith("Z")
            assert direct == through
        else:
            assert written.split(" ", 1)[1] == logged.split(" ", 1)[1]
            assert written.split(" ", 1)[0].endswith("Z")
    assert "uid=u-1 kind=Pod durationMs=1.25 images=" in stream.getvalue() or fmt == "json"


def test_a_line_follows_logging_set_up_again() -> None:
    first, log = emitted("json")
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    line.write("u-1", 1.0)
    line.write("u-2", 1.0)
    second, _ = emitted("text")
    line.write("u-3", 1.0)
    assert [json.loads(x)["uid"] for x in first.getvalue().splitlines()] == ["u-1", "u-2"]
    assert "uid=u-3 " in second.getvalue()


def test_a_line_skips_logging_records_while_logging_is_as_setup_left_it() -> None:
    stream, log = emitted("json")
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append(factory(*args, **kwargs))
        return made[-1]

    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    logging.setLogRecordFactory(counting)
    try:
        line.write("u-1", 0.5)
        line.write("u-2", 0.5)
    finally:
        logging.setLogRecordFactory(factory)
    assert made == []
    assert [json.loads(x)["uid"] for x in stream.getvalue().splitlines()] == ["u-1", "u-2"]


def test_a_line_goes_through_logging_once_another_handler_listens() -> None:
    stream, log = emitted("json")
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    seen: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(listener)
    line.write("u-3", 2.0)
    (record,) = seen
    assert record.getMessage() == "admission patched"
    assert getattr(record, logs.FIELDS) == {**FIELDS, "uid": "u-3", "durationMs": 2.0}
    assert json.loads(stream.getvalue())["uid"] == "u-3"  # and setup's handler still has it


def test_a_line_holding_a_stand_in_is_written_whole() -> None:
    stream, log = emitted("text")
    fields = {**FIELDS, "images": ["pinhookBlank1x7Q"]}
    line = logs.Line(log, "admission patched", fields, ("uid", "durationMs"))
    line.write("u-4", 3.0)
    line.write("u-5", 4.0)
    assert "uid=u-4 kind=Pod durationMs=3.0 images=pinhookBlank1x7Q" in stream.getvalue()
    assert "uid=u-5 kind=Pod durationMs=4.0 images=pinhookBlank1x7Q" in stream.getvalue()


def test_a_line_below_the_level_is_not_written() -> None:
    stream, log = emitted("json", level="warning")
    logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs")).write("u-5", 1.0)
    assert stream.getvalue() == ""


def test_a_lines_size_stays_what_was_counted() -> None:
    """An answer counts its line in when kept and out when replaced: the same figure."""
    _, log = emitted("json")
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    counted = line.size
    for uid in ("u-1", "u-2", "u-3"):  # whole, then cut, then from the cut
        line.write(uid, 1.0)
    assert line.size == counted > len("admission patched")


class _CountedWrites(io.StringIO):
    """A stream that counts its writes, and tells a waiting test of each."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.writes += 1
        self.written.set()
        return super().write(text)


HOLD = 0.05  # the tests' hold: short, so that a test waiting for its end is quick
# A hold no test outlasts: for the tests that look while lines are held, and end it themselves.
LONG_HOLD = 3600.0


def held(
    fmt: str = "json", hold_seconds: float = HOLD
) -> tuple[_CountedWrites, logging.Handler, logging.Logger]:
    stream = _CountedWrites()
    handler = logs.setup("info", fmt, stream=stream, hold_seconds=hold_seconds)
    return stream, handler, logging.getLogger("webhook.test")


async def test_held_lines_outlast_the_loops_turns() -> None:
    stream, handler, log = held(hold_seconds=LONG_HOLD)
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    loop = asyncio.get_running_loop()
    for uid in ("u-1", "u-2", "u-3"):
        line.write(uid, 1.0, loop=loop)
        await asyncio.sleep(0)  # a turn of the loop ends: the line is still held
    assert stream.getvalue() == ""
    handler.flush()
    assert [json.loads(x)["uid"] for x in stream.getvalue().splitlines()] == ["u-1", "u-2", "u-3"]
    assert stream.writes == 1


async def test_held_lines_are_written_together_when_the_hold_ends() -> None:
    stream, _, log = held()
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    for uid in ("u-1", "u-2", "u-3"):
        line.write(uid, 1.0, loop=loop)
    assert stream.getvalue() == ""
    await asyncio.wait_for(stream.written.wait(), 10)
    assert loop.time() - began >= HOLD
    assert [json.loads(x)["uid"] for x in stream.getvalue().splitlines()] == ["u-1", "u-2", "u-3"]
    assert stream.writes == 1


async def test_held_lines_keep_their_place_before_any_other_record() -> None:
    stream = io.StringIO()
    handler = logs.setup("info", "text", stream=stream)
    log = logging.getLogger("webhook.test")
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    line.write("u-1", 1.0, loop=asyncio.get_running_loop())
    log.warning("after the admission")
    assert ["uid=u-1" in x for x in stream.getvalue().splitlines()] == [True, False]
    line.write("u-2", 1.0, loop=asyncio.get_running_loop())
    handler.flush()  # as logging.shutdown does at exit
    assert "uid=u-2" in stream.getvalue().splitlines()[-1]


async def test_held_lines_come_first_when_logging_is_set_up_again_or_closed() -> None:
    stream = io.StringIO()
    handler = logs.setup("info", "text", stream=stream)
    log = logging.getLogger("webhook.test")
    loop = asyncio.get_running_loop()
    logs.Line(log, "admission first", {"uid": ""}, ("uid",)).write("u-1", loop=loop)
    logs.setup("info", "text", stream=stream)  # the old handler goes: its line first
    log.warning("second")
    assert [("first" in x, "second" in x) for x in stream.getvalue().splitlines()] == [
        (True, False),
        (False, True),
    ]
    handler = logging.getLogger().handlers[0]
    logs.Line(log, "admission third", {"uid": ""}, ("uid",)).write("u-3", loop=loop)
    handler.close()
    assert "admission third" in stream.getvalue().splitlines()[-1]


async def test_lines_held_on_a_loop_that_is_gone_come_first_when_another_holds_one() -> None:
    """A hold ends by a timer on the loop it began on; when that loop never runs again (a
    test's, or a server's that stopped), the next loop's first line writes them out."""
    stream, _, log = held("text")
    gone = asyncio.new_event_loop()
    logs.Line(log, "admission first", {"uid": ""}, ("uid",)).write("u-1", loop=gone)
    gone.close()
    assert stream.getvalue() == ""
    stream.written.clear()
    second = logs.Line(log, "admission second", {"uid": ""}, ("uid",))
    second.write("u-2", loop=asyncio.get_running_loop())
    assert ["first" in x for x in stream.getvalue().splitlines()] == [True]
    stream.written.clear()
    await asyncio.wait_for(stream.written.wait(), 10)  # this loop's hold ends
    assert ["second" in x for x in stream.getvalue().splitlines()] == [False, True]


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_the_held_writes_of_a_cut_line_are_one_line_listing_each(fmt: str) -> None:
    """A ReplicaSet's Pods answered within one hold: one line, the first Pod's uid and
    duration in their fields and every later one's under ``alike``; the next hold starts a
    line."""
    stream, handler, log = held(fmt, hold_seconds=LONG_HOLD)
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    line.write("u-0", 0.5)
    line.write("u-1", 0.5)  # written whole, then cut
    before = len(stream.getvalue().splitlines())
    loop = asyncio.get_running_loop()
    other = logs.Line(log, "admission denied", {"uid": ""}, ("uid",))
    for uid, ms in (("u-2", 1.0), ("u-3", 2.5), ("u-4", 0.25)):
        line.write(uid, ms, loop=loop)
        other.write(f"o{uid}", loop=loop)
        await asyncio.sleep(0)  # turns of the loop end, the hold does not
    assert stream.getvalue().count("\n") == before
    handler.flush()
    written = stream.getvalue().splitlines()[before:]
    assert len(written) == 4  # the line, then the other line's three (each written whole)
    if fmt == "json":
        entry = json.loads(written[0])
        first = (entry["uid"], entry["durationMs"], entry["images"])
        assert first == ("u-2", 1.0, FIELDS["images"])
        assert entry[logs.ALIKE] == [
            {"uid": "u-3", "durationMs": 2.5},
            {"uid": "u-4", "durationMs": 0.25},
        ]
        assert [json.loads(x)["uid"] for x in written[1:]] == ["ou-2", "ou-3", "ou-4"]
    else:
        assert "uid=u-2 kind=Pod durationMs=1.0 images=" in written[0]
        assert written[0].endswith(' alike="uid=u-3 durationMs=2.5, uid=u-4 durationMs=0.25"')
    line.write("u-5", 3.0, loop=loop)
    handler.flush()
    last = stream.getvalue().splitlines()[-1]
    assert "u-5" in last and "u-2" not in last and logs.ALIKE not in last


async def test_so_many_held_admissions_are_written_at_once() -> None:
    """At ``HELD_LIMIT`` admissions held, they are written without waiting for the hold's
    end: writing them is a short pause. A shared line lists at most ``ALIKE_LIMIT``."""
    stream, _, log = held()
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    line.write("u-0", 0.5)
    line.write("u-1", 0.5)  # written whole, then cut
    other = logs.Line(log, "admission denied", {"uid": ""}, ("uid",))
    loop = asyncio.get_running_loop()
    other.write("o-0", loop=loop)
    for i in range(logs.HELD_LIMIT):
        line.write(f"h-{i}", 1.0, loop=loop)
    denied, *shared = (json.loads(x) for x in stream.getvalue().splitlines()[2:])
    assert denied["uid"] == "o-0"
    uids = [
        uid for entry in shared for uid in [entry["uid"], *(e["uid"] for e in entry[logs.ALIKE])]
    ]
    assert uids == [f"h-{i}" for i in range(logs.HELD_LIMIT - 1)]
    assert max(len(entry[logs.ALIKE]) for entry in shared) == logs.ALIKE_LIMIT - 1
    stream.written.clear()
    await asyncio.wait_for(stream.written.wait(), 10)  # the last one, at the hold's end
    last = json.loads(stream.getvalue().splitlines()[-1])
    assert last["uid"] == f"h-{logs.HELD_LIMIT - 1}" and logs.ALIKE not in last


class _RecordedWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.each: list[str] = []

    def write(self, text: str) -> int:
        self.each.append(text)
        return super().write(text)


async def test_held_lines_go_out_in_writes_of_whole_lines_no_other_process_splits() -> None:
    """``serve --workers`` share stderr: a write to a pipe of up to PIPE_BUF bytes is never
    interleaved with another's, so held lines go out in such writes, a longer line alone.
    Alone on its stream, a process writes them all at once."""
    stream = _RecordedWrites()
    handler = logs.setup("info", "json", stream=stream, hold_seconds=HOLD, shared=True)
    log = logging.getLogger("webhook.test")
    loop = asyncio.get_running_loop()
    for i in range(40):  # each its own line, of 0.1 to 12 KB
        logs.Line(log, "admission patched", {"pad": "é" * (150 * i)}, ("uid",)).write(
            f"u-{i}", loop=loop
        )
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert [json.loads(x)["uid"] for x in lines] == [f"u-{i}" for i in range(40)]
    assert all(text.endswith("\n") for text in stream.each)
    for text in stream.each:
        assert len(text.encode()) <= select.PIPE_BUF or text.count("\n") == 1
    assert len(stream.each) < 40  # short lines shared their writes
    alone = _RecordedWrites()
    handler = logs.setup("info", "json", stream=alone, hold_seconds=HOLD)
    for i in range(40):
        logs.Line(log, "admission patched", {"pad": "é" * (150 * i)}, ("uid",)).write(
            f"u-{i}", loop=loop
        )
    handler.flush()
    assert [json.loads(x)["uid"] for x in alone.getvalue().splitlines()] == [
        f"u-{i}" for i in range(40)
    ]
    assert len(alone.each) == 1


async def test_a_held_line_has_the_time_of_its_first_write() -> None:
    stream, handler, log = held()
    count = itertools.count()
    handler.formatter.timestamp.now = lambda: f"2026-01-01T00:00:00.{next(count):03d}Z"  # type: ignore[attr-defined]
    line = logs.Line(log, "admission patched", {"uid": ""}, ("uid",))
    line.write("u-0")  # .000, written whole
    line.write("u-1")  # .001, then cut
    loop = asyncio.get_running_loop()
    line.write("u-2", loop=loop)  # .002, held
    logs.Line(log, "admission denied", {"uid": ""}, ("uid",)).write("o-1", loop=loop)  # .003
    line.write("u-3", loop=loop)
    handler.flush()
    held_line = json.loads(stream.getvalue().splitlines()[2])
    assert (held_line["uid"], held_line["time"]) == ("u-2", "2026-01-01T00:00:00.002Z")


async def test_a_record_logged_between_like_writes_keeps_its_place() -> None:
    stream, _, log = held()
    line = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    line.write("u-0", 0.5)
    line.write("u-1", 0.5)
    loop = asyncio.get_running_loop()
    line.write("u-2", 1.0, loop=loop)
    log.warning("between")
    line.write("u-3", 1.0, loop=loop)
    line.write("u-4", 1.0, loop=loop)
    stream.written.clear()
    await asyncio.wait_for(stream.written.wait(), 10)  # the hold's end
    entries = [json.loads(x) for x in stream.getvalue().splitlines()[2:]]
    assert [(e.get("uid"), e["msg"]) for e in entries] == [
        ("u-2", "admission patched"),
        (None, "between"),
        ("u-3", "admission patched"),
    ]
    assert logs.ALIKE not in entries[0]
    assert entries[2][logs.ALIKE] == [{"uid": "u-4", "durationMs": 1.0}]


async def test_a_held_line_that_cannot_be_written_costs_no_other() -> None:
    """A value the formatter refuses loses that line alone, reported as logging reports a
    failure: the lines held with it are written, and so are its like lines' later holds."""
    stream, handler, log = held()
    failing = logs.Line(log, "admission patched", FIELDS, ("uid", "durationMs"))
    other = logs.Line(log, "admission unchanged", FIELDS, ("uid", "durationMs"))
    for line in (failing, other):
        line.write("u-0", 0.5)
        line.write("u-1", 0.5)  # written whole, then cut
    before = len(stream.getvalue().splitlines())
    loop = asyncio.get_running_loop()
    failing.write(2**70, 1.0, loop=loop)  # over 64 bits: orjson refuses it
    other.write("o-1", 1.0, loop=loop)
    handler.flush()
    other.write("o-2", 1.0, loop=loop)
    failing.write("u-2", 1.0, loop=loop)
    handler.flush()
    written = [json.loads(x)["uid"] for x in stream.getvalue().splitlines()[before:]]
    assert written == ["o-1", "o-2", "u-2"]
    with pytest.raises(ValueError, match="values for the blanks"):
        other.write("o-3", loop=loop)


@pytest.mark.parametrize(
    "blanks", [(), ("uid",), ("uid", "durationMs"), ("uid", "durationMs", "x")]
)
async def test_a_shared_line_lists_each_later_write_by_its_blanks(blanks: tuple[str, ...]) -> None:
    stream, handler, log = held()
    line = logs.Line(log, "admission patched", {"images": []}, blanks)
    rows = [tuple(f"{blank}-{i}" for blank in blanks) for i in range(4)]
    line.write(*rows[0])
    line.write(*rows[0])  # written whole, then cut
    for row in rows[1:]:
        line.write(*row, loop=asyncio.get_running_loop())
    handler.flush()
    shared = json.loads(stream.getvalue().splitlines()[-1])
    assert [shared[blank] for blank in blanks] == list(rows[1])
    assert shared[logs.ALIKE] == [dict(zip(blanks, row, strict=True)) for row in rows[2:]]


@pytest.mark.parametrize(("workers", "shared"), [(["--workers", "2"], True), ([], False)])
def test_serve_with_workers_logs_as_one_of_several_processes(
    monkeypatch: pytest.MonkeyPatch, workers: list[str], shared: bool
) -> None:
    from webhook import cli

    asked: list[bool] = []

    def setup(*_args: object, shared: bool = False, **_options: object) -> None:
        asked.append(shared)

    monkeypatch.setattr(cli.logs, "setup", setup)
    monkeypatch.setattr(cli, "_dispatch", lambda _args: 0)
    assert cli.main(["serve", *workers]) == 0
    assert asked == [shared]
