"""One logging setup for the whole process: pinhook, uvicorn and the HTTP clients.

Every record goes through one handler on the root logger and one formatter, ``json`` (one
object per line, for log collectors; the manifests' default) or ``text`` (for people, the
default on a terminal). Either way a record is exactly one line: newlines in a message (a
config error lists its problems on several lines) or a traceback are escaped, so no collector
splits one event into several.

Structured fields travel in ``extra={"fields": {...}}``: the JSON formatter merges them into the
object, the text formatter appends them as ``key=value``.

The HTTP clients' own loggers (httpx and its twin httpx2 under lightkube, and httpcore below
them) say one line per request at INFO and a dozen per request at DEBUG: they are held at
WARNING, httpx at DEBUG with ``--log-level debug``, httpcore and the registry connections'
trace (``webhook.oci.connection``) only with ``--log-http-trace``.
Their text is scrubbed (``redact.scrub``) before it is written: they print URLs, and a URL is
text a registry chose.
"""

from __future__ import annotations

import asyncio
import logging
import select
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final, TextIO

import orjson

from .redact import scrub

LEVELS: Final = ("debug", "info", "warning", "error", "critical")
FORMATS: Final = ("json", "text")
FIELDS: Final = "fields"  # the ``extra`` key structured fields travel under

# Loggers of the libraries pinhook runs on; quiet unless asked.
REQUEST_LOGGERS: Final = ("httpx", "httpx2")
# The HTTP clients' connection traces: the Kubernetes client's (httpcore2), and the registry
# client's (its own connections, httpcore's where httptools is missing).
TRACE_LOGGERS: Final = ("httpcore", "httpcore2", "webhook.oci.connection")
SERVER_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
_THIRD_PARTY: Final = (*REQUEST_LOGGERS, *TRACE_LOGGERS, "uvicorn")
# uvicorn's own name for its main logger says nothing about errors: call it what it is.
_RENAMED: Final = {"uvicorn.error": "uvicorn"}
_MAX_THIRD_PARTY_TEXT: Final = 4000
# How long an admission line is held, at most, to be written with the others of that time:
# one system call, and one line for like admissions, instead of one of each for every
# admission. Short beside what anyone reading the log waits, long beside a loop's turn.
HOLD_SECONDS: Final = 0.1
# Admissions held at once, at most (a line each, or an entry of a shared line); at this many
# they are written at once. It bounds the pause writing them makes: about 70 us, in the
# request path, rather than a millisecond every HOLD_SECONDS at 10,000 admissions a second.
HELD_LIMIT: Final = 128
# Entries of one shared line, at most: a Pod's admission line is about a kilobyte, an entry
# about 60 bytes, so the line fits one write that no other process's interleaves with.
ALIKE_LIMIT: Final = 32
# A write to a pipe of at most this many bytes is never interleaved with another process's
# (POSIX): where processes share the stream (``serve --workers``), held lines go out in
# chunks of whole lines this long (a longer line alone).
_ATOMIC_WRITE: Final = getattr(select, "PIPE_BUF", 512)


def default_format(stream: TextIO | None = None) -> str:
    """``text`` for a person at a terminal, ``json`` for everything else."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup(
    level: str = "info",
    fmt: str | None = None,
    *,
    http_trace: bool = False,
    stream: TextIO | None = None,
    hold_seconds: float = HOLD_SECONDS,
    shared: bool = False,
) -> logging.Handler:
    """Route every logger through one handler on ``stream`` (stderr); returns the handler.
    Admission lines are held up to ``hold_seconds`` (``Line``); ``shared``: other processes
    write to the same stream, and no line of theirs may land inside one of these.

    Calling it again replaces the handler: the last call wins.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    stream = stream or sys.stderr
    fmt = fmt or default_format(stream)
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    _record_only_what_is_written()
    handler = _LineHandler(stream, hold_seconds, shared)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        old.flush()  # lines it holds come before the new handler's
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    debug = level == "debug"
    for name in (*REQUEST_LOGGERS, *SERVER_LOGGERS):
        # uvicorn repeats at INFO what pinhook says itself ("listening"), and its errors are
        # WARNING and above.
        _route(name, logging.DEBUG if debug else logging.WARNING)
    for name in TRACE_LOGGERS:
        _route(name, logging.DEBUG if http_trace else logging.WARNING)
    return handler


def _record_only_what_is_written() -> None:
    # Neither formatter writes the caller, thread or process; every admission logs a line,
    # and finding the caller's frame is a third of what a record costs (the logging HOWTO's
    # "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _route(name: str, level: int) -> None:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(level)


def _message(record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.name.startswith(_THIRD_PARTY):
        message = scrub(message, _MAX_THIRD_PARTY_TEXT)
    return message


class _Timestamps:
    """RFC 3339 UTC times to the millisecond; the seconds part is formatted once a second
    (strftime is most of a timestamp's cost, and every admission logs a line), and the
    time now once a millisecond (a busy webhook writes several lines in one)."""

    def __init__(self) -> None:
        # One attribute each, set at once: a Line takes its time outside the handler's lock.
        self._last: tuple[int, str] = (-1, "")
        self._now: tuple[int, str] = (-1, "")

    def __call__(self, created: float, msecs: float) -> str:
        second = int(created)
        last, prefix = self._last
        if second != last:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._last = (second, prefix)
        return f"{prefix}.{int(msecs):03d}Z"

    def now(self) -> str:
        """The time now, as a record made now would have it."""
        created = time.time()
        msecs = (created % 1) * 1000  # as a record has it, and to the same millisecond
        millisecond = int(created) * 1000 + int(msecs)
        last, text = self._now
        if millisecond != last:
            text = self(created, msecs)
            self._now = (millisecond, text)
        return text


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, FIELDS, None)
    return fields if isinstance(fields, Mapping) else {}


class _LineFormatter(logging.Formatter):
    """A record as one line: ``render`` of its parts, which ``Line`` fills in too."""

    time_quote: str  # around a time, as ``value`` would write it

    def __init__(self) -> None:
        super().__init__()
        self.timestamp = _Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.render(
            self.timestamp(record.created, record.msecs),
            record.levelname,
            record.name,
            _message(record),
            _fields(record),
            exc,
        )

    def render(
        self,
        when: str,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, Any],
        exc: str | None = None,
    ) -> str:
        raise NotImplementedError

    def value(self, value: Any) -> str:
        """How a field's value is written in a line."""
        raise NotImplementedError

    def appended(self, line: str, key: str, value: Any) -> str:
        """``line``, as ``render`` wrote it, with one more field at its end."""
        raise NotImplementedError

    def filled(
        self, parts: tuple[str, ...], values: tuple[Any, ...], when: str | None = None
    ) -> str:
        """A line cut by ``_cut``, with ``values`` in its blanks and the time ``when`` (a
        ``timestamp``), else now."""
        value = self.value
        # A time holds digits, "-", ":", ".", "T" and "Z": nothing to escape in either format.
        quote = self.time_quote
        text = [parts[0], quote, when or self.timestamp.now(), quote]
        for part, blank in zip(parts[1:-1], values, strict=True):
            text += (part, value(blank))
        text.append(parts[-1])
        return "".join(text)


class JsonFormatter(_LineFormatter):
    """One JSON object per line: time, level, logger, msg, the record's fields, exc."""

    time_quote = '"'

    def render(
        self,
        when: str,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, Any],
        exc: str | None = None,
    ) -> str:
        entry: dict[str, Any] = {
            "time": when,
            "level": level.lower(),
            "logger": _RENAMED.get(logger, logger),
            "msg": message,
        }
        entry.update(fields)
        if exc is not None:
            entry["exc"] = exc
        return orjson.dumps(entry, default=str).decode()

    def value(self, value: Any) -> str:
        return orjson.dumps(value, default=str).decode()

    def appended(self, line: str, key: str, value: Any) -> str:
        return f"{line[:-1]},{self.value(key)}:{self.value(value)}}}"  # inside the object


class TextFormatter(_LineFormatter):
    """``TIME LEVEL logger: message key=value ...`` on one line."""

    time_quote = ""

    def render(
        self,
        when: str,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, Any],
        exc: str | None = None,
    ) -> str:
        name = _RENAMED.get(logger, logger)
        line = f"{when} {level} {name}: {_one_line(message)}"
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        if exc is not None:
            line += " exc=" + _one_line(exc)
        return line

    def value(self, value: Any) -> str:
        return _text_value(value)

    def appended(self, line: str, key: str, value: Any) -> str:
        return f"{line} {key}={self.value(value)}"


class Line:
    """One INFO line of ``logger`` whose message and fields are known but for a few
    (``blanks``) and the time. pinhook writes one per admission, and the same admission line
    again for each Pod of a ReplicaSet: a record through ``logging`` (the record, the logger's
    walk to its handler, the formatter) costs four times what the line itself does.

    The line is written straight to the handler ``setup`` installed while the logger's records
    go to that handler alone, as ``setup`` leaves it; otherwise (another handler added, as
    pytest's log capture does, or a filter) it goes through ``logging`` as any record would.
    Either way the text is what the formatter writes for such a record. Written a second time,
    it is rendered once more with stand-ins for the blanks and the time, and cut there: from
    then on only the blanks and the time are written out.

    Written with ``loop`` (the running loop), it is held by the handler for up to its hold
    (``setup``'s ``hold_seconds``) and written with the other lines of that time. From its
    cut on, the writes held at once are one line (``_Alike``): the first write's values in the
    blanks and its time, and each later one's under ``ALIKE``. A ReplicaSet's Pods are then
    one line, listing each one's uid and duration, rather than the same kilobyte of images
    again for each.
    """

    __slots__ = ("_alike", "_blanks", "_fields", "_handler", "_logger", "_message", "_parts")

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        fields: Mapping[str, Any],
        blanks: tuple[str, ...],
    ) -> None:
        self._logger = logger
        self._message = message
        self._fields = fields
        self._blanks = blanks
        self._handler: _LineHandler | None = None  # the handler last written to
        self._parts: tuple[str, ...] | None = None  # cut for that handler; () if it cannot be
        self._alike: _Alike | None = None  # the writes held as one line, while they are

    @property
    def size(self) -> int:
        """About what the line holds in memory, its fields and the text cut from them, once
        it is: an answer kept for later Pods counts it. The same figure all along, so that
        what is counted in can be counted out again."""
        return 2 * (len(self._message) + _size(self._fields))

    def write(self, *values: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """The line, with ``values`` in place of the blanks (in their order) and the time now;
        with ``loop``, the running loop, held (``_LineHandler``), and in one line with the
        other writes held with it once the line is cut."""
        alike = self._alike
        if loop is not None and alike is not None and alike.add(values):
            return
        handler = _direct_handler(self._logger)
        if handler is None:
            if self._logger.isEnabledFor(logging.INFO):
                self._logger.info(self._message, extra={FIELDS: self._filled(values)})
            return
        formatter = handler.formatter
        parts = self._parts
        if parts and handler is self._handler:
            if loop is None:
                handler.write(formatter.filled(parts, values))
            else:
                alike = _Alike(handler, parts, self._blanks, values)
                self._alike = handler.hold(alike, loop)
            return
        if handler is not self._handler:  # the first line, or logging was set up again
            self._handler, self._parts = handler, None
        elif parts is None:
            self._parts = _cut(
                formatter, self._logger.name, self._message, self._fields, self._blanks
            )
            if self._parts:
                handler.write(formatter.filled(self._parts, values), loop)
                return
        when = formatter.timestamp.now()
        line = formatter.render(
            when, "INFO", self._logger.name, self._message, self._filled(values)
        )
        handler.write(line, loop)

    def _filled(self, values: tuple[Any, ...]) -> dict[str, Any]:
        fields = dict(self._fields)
        fields.update(zip(self._blanks, values, strict=True))
        return fields


ALIKE: Final = "alike"  # the field listing the later writes of a line held as one


class _Alike:
    """The writes of one cut line held as one line: the first one's values in the blanks
    and its time, the others' (each as the blanks' fields) under ``ALIKE``.

    The values are held one after another in one list, not as the tuple each write comes
    with: that tuple is then freed at once, and its memory used again by the next write,
    rather than a hundred kept alive until the line is written (4 us an admission, in an
    interleaved A/B of the server under like admissions)."""

    __slots__ = ("_blanks", "_first", "_handler", "_later", "_parts", "_when", "entries", "held")

    def __init__(
        self,
        handler: _LineHandler,
        parts: tuple[str, ...],
        blanks: tuple[str, ...],
        first: tuple[Any, ...],
    ) -> None:
        _check_blanks(first, blanks)
        self._handler = handler
        self._parts = parts
        self._blanks = blanks
        self._first = first
        self._later: list[Any] = []  # the later writes' values, one after another
        self._when = handler.formatter.timestamp.now()
        self.entries = 1  # the writes held
        self.held = True  # until the handler writes it

    def add(self, values: tuple[Any, ...]) -> bool:
        """Hold ``values`` too; False once the line is written (or being written) or full
        (``ALIKE_LIMIT``). Values that do not fit the blanks are refused here, at the write,
        not when the line is written."""
        _check_blanks(values, self._blanks)
        handler = self._handler
        with handler.lock:  # type: ignore[union-attr]
            if not self.held or self.entries >= ALIKE_LIMIT:
                return False
            self._later += values
            self.entries += 1
            handler.held_one_more()
            return True

    def text(self, formatter: _LineFormatter) -> str:
        line = formatter.filled(self._parts, self._first, self._when)
        if self.entries == 1:
            return line
        alike = _as_fields(self._blanks, self._later, self.entries - 1)
        return formatter.appended(line, ALIKE, alike)


def _check_blanks(values: tuple[Any, ...], blanks: tuple[str, ...]) -> None:
    if len(values) != len(blanks):
        raise ValueError(f"{len(values)} values for the blanks {blanks}")


def _as_fields(blanks: tuple[str, ...], values: list[Any], entries: int) -> list[dict[str, Any]]:
    """``values`` of ``entries`` writes, as many for each as ``blanks`` one after another
    (``_Alike.add`` checked), as the blanks' fields of each. The admission line's two are put
    in directly: ``dict(zip())`` takes three times as long, for each of up to ``ALIKE_LIMIT``."""
    if not blanks:
        return [{} for _ in range(entries)]
    each = [iter(values)] * len(blanks)
    if len(blanks) == 2:
        first, second = blanks
        return [{first: a, second: b} for a, b in zip(*each, strict=True)]
    return [dict(zip(blanks, row, strict=True)) for row in zip(*each, strict=True)]


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``setup`` installs; ``Line`` writes to it directly.

    Lines written with a loop are held for up to ``hold_seconds`` and written together, by a
    timer on that loop, or at once when ``HELD_LIMIT`` admissions are held: one system call
    for the admissions of that time, rather than one each (``shared``: one for each
    ``_ATOMIC_WRITE`` bytes of whole lines). A record through ``logging``, a
    flush (``logging.shutdown`` flushes at exit), closing, and a line held on another loop
    (the timer's may never run again) write the held lines first, so lines keep the order
    they were written in; the later writes of a line held as one (``_Alike``) are in the
    place of its first.
    """

    formatter: _LineFormatter

    def __init__(
        self, stream: TextIO, hold_seconds: float = HOLD_SECONDS, shared: bool = False
    ) -> None:
        super().__init__(stream)
        self._hold_seconds = hold_seconds
        self.shared = shared  # other processes write to the stream too
        self._held: list[str | _Alike] = []
        self._admissions_held = 0  # the lines held, and the later writes of those held as one
        self._held_on: asyncio.AbstractEventLoop | None = None  # whose timer is to come

    def write(self, line: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """What ``emit`` does with a formatted record; with ``loop``, held."""
        if loop is not None:
            self._hold(line, loop)
            return
        try:
            with self.lock:  # type: ignore[union-attr]
                self._write_held()
                self.stream.write(line + self.terminator)
                self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": line}))

    def hold(self, alike: _Alike, loop: asyncio.AbstractEventLoop) -> _Alike | None:
        """Hold ``alike``, as ``write`` holds a line; None when it cannot be (the failure
        reported as ``write`` reports one)."""
        return alike if self._hold(alike, loop) else None

    def held_one_more(self) -> None:
        """Under the lock: one more admission held (a later write of a line held as one);
        at ``HELD_LIMIT``, all are written now."""
        self._admissions_held += 1
        if self._admissions_held >= HELD_LIMIT:
            self._write_held_now()

    def _hold(self, line: str | _Alike, loop: asyncio.AbstractEventLoop) -> bool:
        try:
            with self.lock:  # type: ignore[union-attr]
                if self._held_on is not loop:
                    if self._held:  # held on a loop whose timer may never run again
                        self._write_held_now()
                    loop.call_later(self._hold_seconds, self._end_of_hold)
                    self._held_on = loop
                self._held.append(line)
                self.held_one_more()
        except Exception:
            text = line if isinstance(line, str) else "a held line"
            self.handleError(logging.makeLogRecord({"msg": text}))
            return False
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if self._held:  # handle() holds the lock
            self._write_held_now()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_held()
            super().flush()

    def close(self) -> None:
        self.flush()
        super().close()

    def _end_of_hold(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._held_on = None
            self._write_held_now()

    def _write_held_now(self) -> None:
        try:
            with self.lock:  # type: ignore[union-attr]
                self._write_held()
                self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "held lines"}))

    def _write_held(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self._admissions_held = 0
            for line in held:
                if isinstance(line, _Alike):
                    line.held = False  # under the lock, as ``add`` looks: none adds to it now
            lines = [text for text in map(self._text, held) if text is not None]
            if not self.shared:
                lines.append("")
                self.stream.write(self.terminator.join(lines))
                return
            for chunk in _whole_lines(lines, self.terminator):
                self.stream.write(chunk)
                self.stream.flush()  # one write each, whatever the stream's buffering

    def _text(self, line: str | _Alike) -> str | None:
        """A held line's text; None when it cannot be rendered (reported, the others kept)."""
        if isinstance(line, str):
            return line
        try:
            return line.text(self.formatter)
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "a held line"}))
            return None


def _whole_lines(lines: list[str], terminator: str) -> Iterator[str]:
    """``lines``, each ended, in as few chunks as hold whole lines in ``_ATOMIC_WRITE`` bytes
    (a line longer than that alone)."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        line += terminator
        # As stderr writes what UTF-8 cannot encode (a lone surrogate): escaped.
        length = len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
        if chunk and size + length > _ATOMIC_WRITE:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)


def _direct_handler(logger: logging.Logger) -> _LineHandler | None:
    """The handler ``setup`` installed, when ``logger``'s INFO records go to it alone."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    node: logging.Logger | None = logger
    while node is not None and node.parent is not None:  # up to the root, which has none
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    if node is None or node.filters or len(node.handlers) != 1:
        return None
    handler = node.handlers[0]
    if type(handler) is not _LineHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler


# Stands in for a blank, and for the time, in the line rendered once: plain letters, which
# both formats write as they are (JSON in quotes), and no image name or message holds.
_STAND_IN = "pinhookBlank{}x7Q"


def _cut(
    formatter: _LineFormatter,
    logger: str,
    message: str,
    fields: Mapping[str, Any],
    blanks: tuple[str, ...],
) -> tuple[str, ...]:
    """The line rendered with stand-ins for the time and ``blanks``, cut at them; empty when
    a stand-in shows up elsewhere in it (then each line is rendered whole)."""
    stand_ins = [_STAND_IN.format(i) for i in range(len(blanks) + 1)]
    filled = dict(fields)
    filled.update(zip(blanks, stand_ins[1:], strict=True))
    text = formatter.render(stand_ins[0], "INFO", logger, message, filled)
    parts: list[str] = []
    for stand_in in stand_ins:
        before, found, text = text.partition(formatter.value(stand_in))
        if not found or stand_in in before:
            return ()
        parts.append(before)
    if any(stand_in in text for stand_in in stand_ins):
        return ()
    parts.append(text)
    return tuple(parts)


def _size(fields: Mapping[str, Any]) -> int:
    """About the characters of ``fields`` (lists of text are most of a line)."""
    total = 0
    for value in fields.values():
        if isinstance(value, list):
            total += sum(len(str(item)) for item in value)
        else:
            total += len(str(value))
    return total


def _one_line(text: str) -> str:
    if "\n" not in text and "\r" not in text:
        return text
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        value = ", ".join(_item(v) for v in value)
    elif isinstance(value, Mapping):
        value = _item(value)
    text = str(value)
    if text and not any(c in text for c in ' "=\n\r\\'):
        return text
    return orjson.dumps(text).decode()


def _item(value: Any) -> str:
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
