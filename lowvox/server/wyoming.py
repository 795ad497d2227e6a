"""Home Assistant's Wyoming protocol: text to speech over TCP, next to the HTTP server.

`WyomingServer` runs in the app's lifespan, on the same event loop as HTTP, and speaks
through the same `EngineHub`: every request is planned and queued exactly as an HTTP
request is (`synthesis.plan_job` + `submit`), so both share one model, one queue and one
voice library. Events are written with the `wyoming` package's own classes and read here
with size limits (the package's reader accepts any length a client announces).

A connection has two tasks. The reader parses events, keeps the streamed text and queues
work in order; the speaker runs that work one item at a time and writes the answers (info,
audio, errors). When the client goes away the speaker is cancelled, and with it the job it
was waiting on, so a row of the batch is freed as an HTTP client's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wyoming.audio import AudioChunk as WyomingChunk
from wyoming.audio import AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

import lowvox
from lowvox.audio.encode import StreamEncoder
from lowvox.errors import LowvoxError, UnknownEngine, UnknownVoice
from lowvox.server import synthesis
from lowvox.server.engines import EngineHub, EngineRestarting, EngineSlot
from lowvox.server.state import ServerState
from lowvox.text.split_rules import SPECIAL_CASES
from lowvox.voices import fold_name

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
# A connection with nothing to do that sends nothing for this long is closed (it holds one
# of the MAX_CONNECTIONS places), and so is one that takes none of its audio for this long
# (what it does not read would wait in memory, and its job in the batch, for ever).
IDLE_TIMEOUT_S = 300.0
# Work queued on one connection before its reader waits for the speaker (back-pressure).
MAX_PENDING = 32
# The JSON header line of an event; its data and payload are limited separately.
HEADER_LIMIT = 64 * 1024
SAMPLE_WIDTH = 2  # 16-bit PCM
# How long a refused client's remaining input is read and dropped before closing, and how
# long a closing connection waits for the client to take what is still unsent.
LINGER_S = 2.0
# After a one-shot synthesize fails, a client that sends nothing more for this long is
# closed: Home Assistant ignores `error` events and reads until audio-stop or the end of
# the connection (as wyoming-piper closes it). A client that goes on in time keeps it.
AFTER_ERROR_S = 5.0
_SELECT_PROGRAM = "select-program"  # newer wyoming releases: matched by name for older ones
_ATTRIBUTION = Attribution(name="lowvox", url="")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ProtocolError(Exception):
    """A malformed or oversized event: the client is told why, then its connection ends."""


def max_event_bytes(max_text_chars: int) -> int:
    """The most data + payload one event may carry: the longest text, JSON-escaped."""
    return max_text_chars * 12 + 64 * 1024


async def read_event(
    reader: asyncio.StreamReader, limit: int, idle_timeout: float | None = None
) -> Event | None:
    """The next event, or None at the end of the stream; ProtocolError if malformed or
    over `limit` bytes of data and payload; TimeoutError if no event starts within
    `idle_timeout` seconds (nothing is lost then: reading can go on)."""
    try:
        # Cancelling readline keeps what it had buffered, so the timeout is safe here (and
        # only here: after the header, the data it announces must follow).
        line = await asyncio.wait_for(reader.readline(), idle_timeout)
    except ValueError as e:  # the header line overran the reader's limit
        raise ProtocolError(f"event header over {HEADER_LIMIT} bytes") from e
    except ConnectionError:
        return None
    if not line:
        return None
    header = _json(line, "event header")
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("event header has no type")
    data = header.get("data") or {}
    data_length = _length(header, "data_length")
    payload_length = _length(header, "payload_length")
    if not isinstance(data, dict):
        raise ProtocolError("event data is not an object")
    if data_length + payload_length > limit:
        raise ProtocolError(
            f"event of {data_length + payload_length} bytes, over the limit of {limit}"
        )
    try:
        if data_length:
            extra = _json(await _read_exactly(reader, data_length), "event data")
            if not isinstance(extra, dict):
                raise ProtocolError("event data is not an object")
            data.update(extra)
        payload = await _read_exactly(reader, payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=header["type"], data=data, payload=payload)


def _json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ProtocolError(f"{what} is not JSON") from e
    except RecursionError as e:  # `[[[[...` within the size limit: bad input, not a crash
        raise ProtocolError(f"{what} is nested too deeply") from e


def _length(header: dict[str, Any], key: str) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"event {key} is not a byte count")
    return value


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    # A client that announced data and then stalls is broken, not idle.
    try:
        return await asyncio.wait_for(reader.readexactly(n), IDLE_TIMEOUT_S)
    except asyncio.TimeoutError as e:
        raise ProtocolError("event data did not arrive") from e


# A sentence is complete once its closing mark (and closing quotes or brackets) is followed
# by whitespace, so "3.5" and text still arriving stay whole; CJK marks need no space after
# them, and a line break ends a sentence (LLM lists have no full stops). A run of marks is
# tried from its first mark only: tried from each mark, every try read the rest of the run
# and its closers again to fail the same way (20,000 dots took 10 s).
_SENTENCE_END = re.compile(r"""(?<![.!?…])[.!?…]+["'”’»)\]]*\s+|[。！？]+["'”’」』)\]]*\s*|\n\s*""")
# What the first alternative may have seen of a sentence end before its whitespace arrives.
_UNFINISHED_END = ".!?…\"'”’»)]"


# Words whose full stop ends no sentence: the HTTP splitter's abbreviations of every
# language (`Dr.`, `e.g.`, `Sra.`), and initials (`U.S.`, `J.`). A stream sent "Dr." on its
# own would be spoken as a sentence of its own; joined to what follows, the engine's own
# splitter decides as it does for HTTP.
_KEEPS_DOT = frozenset().union(*SPECIAL_CASES.values())
_INITIALS = re.compile(r"(?:[^\W\d_]\.)+")
_LONGEST_KEPT = max(map(len, _KEEPS_DOT))
_OPENERS = "\"'“‘«(["


def _abbreviation_at(text: str, dot: int) -> bool:
    """Whether the full stop at `dot` closes an abbreviation or initials: looks back at
    most `_LONGEST_KEPT` characters, so a stream of them costs linear time."""
    lo = max(0, dot + 1 - _LONGEST_KEPT)
    i = dot
    while i > lo and not text[i - 1].isspace():
        i -= 1
    if i == lo and i > 0 and not text[i - 1].isspace():
        return False  # a word longer than any abbreviation
    word = text[i : dot + 1].lstrip(_OPENERS)
    return word in _KEEPS_DOT or _INITIALS.fullmatch(word) is not None


def split_complete(text: str, start: int = 0) -> tuple[str, str]:
    """(the complete sentences at the start of `text`, the rest, to wait for more), looking
    for sentence ends from `start` on."""
    end = 0
    for match in _SENTENCE_END.finditer(text, start):
        mark = match.group()
        if mark[0] == "." and not mark.startswith("..") and _abbreviation_at(text, match.start()):
            continue
        end = match.end()
    return text[:end], text[end:]


def add_text(kept: str, text: str) -> tuple[str, str]:
    """`split_complete(kept + text)` for a `kept` with no sentence end in it (the rest of
    the last split): only its unfinished end is looked at again, so a stream arriving a
    character at a time costs no more than one arriving in sentences."""
    if not text.strip(_UNFINISHED_END):
        # Marks and closers alone end no sentence (its whitespace is still to come), and
        # looking again at an unfinished end they only lengthen would read it once per
        # event: 2,000 dots sent one at a time took 48 s.
        return "", kept + text
    start = len(kept.rstrip(_UNFINISHED_END))
    return split_complete(kept + text, start)


# -- what a client asks for: describe ------------------------------------------------------


async def build_info(hub: EngineHub) -> Info:
    """One TTS program per engine, the default engine first (Home Assistant uses the first
    one). Rebuilt on every describe, so voices added over HTTP appear at once.

    Only engines already running are listed besides the default: Home Assistant allows a
    describe one second, and loading another model just to list its voices would both miss
    that and take memory nobody asked for.
    """
    programs = []
    for slot in await _running_slots(hub):
        try:
            programs.append(await asyncio.to_thread(_program, slot))
        except Exception:  # one engine's listing failing must not hide the others
            logger.exception("wyoming: listing the voices of %s failed", slot.name)
    return Info(tts=programs)


async def _running_slots(hub: EngineHub) -> list[EngineSlot]:
    slots = []
    try:
        slots.append(await _engine(hub, None))
    except LowvoxError as e:
        logger.warning("wyoming: the %s engine cannot start: %s", hub.default, e)
    loaded = hub.loaded()
    slots += [loaded[name] for name in hub.names if name in loaded and name != hub.default]
    return slots


async def _engine(hub: EngineHub, name: str | None) -> EngineSlot:
    """The engine's slot, loading it if needed. Shielded: a client that gives up while the
    model loads must not abort the load, or the next request would start it over (and
    clients that always give up first, as a satellite does after a few seconds, would
    never find it loaded)."""
    loading = asyncio.ensure_future(hub.get(name))
    # Its failure is told to the client that waits for it; one that left is not told.
    loading.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(loading)


def _program(slot: EngineSlot) -> TtsProgram:
    engine = slot.engine
    languages = engine.languages()
    voices = [
        TtsVoice(
            name=v.id,
            attribution=_ATTRIBUTION,
            installed=True,
            description=v.name,
            version=None,
            languages=[v.language] if v.language else list(languages),
        )
        for v in engine.voices()
    ]
    return TtsProgram(
        name=slot.name,
        attribution=_ATTRIBUTION,
        installed=True,
        description=f"lowvox {slot.name}",
        version=lowvox.__version__,
        voices=voices,
        supports_synthesize_streaming=True,
    )


# -- what a client asks for: a voice -------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a synthesis goes: an engine, a voice of it (None: its default) and a language
    (None: the server's)."""

    engine: str
    voice: str | None = None
    language: str | None = None


def _language_tag(code: str) -> str:
    return code.strip().lower().replace("_", "-")


async def resolve_target(
    hub: EngineHub, voice: SynthesizeVoice | None, program: str | None
) -> Target:
    """The engine and voice a `SynthesizeVoice` means: a voice by name (the chosen program's
    first, then the other running engines'), or that program's first voice of a language."""
    preferred = await _engine(hub, program)
    if voice is None or (not voice.name and not voice.language):
        return Target(preferred.name)
    if voice.name:
        return await _voice_by_name(hub, voice.name, preferred)
    return await _voice_by_language(hub, voice.language or "", preferred)


async def _voice_by_name(hub: EngineHub, name: str, preferred: EngineSlot) -> Target:
    slots = [preferred]
    slots += [s for n, s in hub.loaded().items() if n != preferred.name]
    wanted = fold_name(name.strip())
    for slot in slots:
        for v in await hub.voices(slot):
            if wanted in (fold_name(v.id), fold_name(v.name)):
                return Target(slot.name, v.id, v.language)
    raise UnknownVoice(name)


async def _voice_by_language(hub: EngineHub, language: str, preferred: EngineSlot) -> Target:
    voices = await hub.voices(preferred)
    wanted = language.strip()
    for v in voices:  # a voice of exactly that language: en_US is espeak's en-us
        if v.language and _language_tag(v.language) == _language_tag(wanted):
            return Target(preferred.name, v.id, wanted)
    # Otherwise the engine picks the voice for that language, as for HTTP requests that name
    # only a language: espeak its main voice ("en" is English, not the first English
    # accent it lists), XTTS its default voice (its voices speak every language). The
    # engine refuses a language it does not know.
    return Target(preferred.name, None, wanted)


# -- one connection ------------------------------------------------------------------------


@dataclass
class _Stream:
    """A streamed synthesis (synthesize-start ... synthesize-stop) being received."""

    voice: SynthesizeVoice | None
    text: str = ""
    target: Target | None = None
    failed: bool = False  # one error per stream; the rest of its text is dropped


Work = Callable[[], Awaitable[None]]


@dataclass
class Connection:
    """One client: events in, work queued in order, answers out."""

    state: ServerState
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    program: str | None = None  # the engine chosen with select-program
    _stream: _Stream | None = None
    _work: asyncio.Queue[Work] = field(default_factory=lambda: asyncio.Queue(MAX_PENDING))
    _busy: int = 0  # work queued or running
    _events: int = 0  # events read so far
    _reading: asyncio.Task | None = None
    _watch: asyncio.Task | None = None  # closes a silent connection after a failure

    @property
    def hub(self) -> EngineHub:
        return self.state.hub

    async def serve(self) -> None:
        reading = self._reading = asyncio.create_task(self._read_events())
        speaking = asyncio.create_task(self._speak())
        try:
            await asyncio.wait({reading, speaking}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The client left, broke the protocol, or the server stops: cancelling the
            # speaker cancels the job it waits on.
            for task in (speaking, reading, self._watch):
                if task is None:
                    continue
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self._close(reading)

    async def _close(self, reading: asyncio.Task) -> None:
        error = reading.exception() if reading.done() and not reading.cancelled() else None
        if isinstance(error, ProtocolError):
            logger.info("wyoming: closing a connection: %s", error)
            await refuse(self.reader, self.writer, Error(text=str(error), code="protocol"))
            return
        if error is not None:
            logger.error("wyoming: reading events failed", exc_info=error)
        await hang_up(self.writer)

    async def _read_events(self) -> None:
        limit = max_event_bytes(self.state.settings.max_text_chars)
        while True:
            try:
                event = await read_event(self.reader, limit, IDLE_TIMEOUT_S)
            except asyncio.TimeoutError:
                if self._busy:
                    continue
                logger.info("wyoming: closing a connection idle for %.0f s", IDLE_TIMEOUT_S)
                return
            if event is None:
                return
            self._events += 1
            await self._handle(event)

    async def _handle(self, event: Event) -> None:
        try:
            await self._dispatch(event)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ProtocolError(f"malformed {event.type} event") from e

    async def _dispatch(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self._queue(self._describe)
        elif Ping.is_type(event.type):
            pong = Pong(text=Ping.from_event(event).text).event()
            await self._queue(lambda: self._write(pong))
        elif event.type == _SELECT_PROGRAM:
            name = _text(event.data["name"])
            await self._queue(lambda: self._select(name))
        elif Synthesize.is_type(event.type):
            # Clients that stream also send the whole text as one synthesize, for servers
            # that cannot stream: inside a stream it is already being spoken.
            if self._stream is None:
                request = Synthesize.from_event(event)
                text, voice = _text(request.text), _voice(request.voice)
                await self._queue(lambda: self._say_once(text, voice))
        elif SynthesizeStart.is_type(event.type):
            await self._start_stream(_voice(SynthesizeStart.from_event(event).voice))
        elif SynthesizeChunk.is_type(event.type):
            await self._add_text(_text(SynthesizeChunk.from_event(event).text))
        elif SynthesizeStop.is_type(event.type):
            await self._stop_stream()
        else:
            logger.debug("wyoming: ignoring a %s event", event.type)

    async def _queue(self, work: Work) -> None:
        self._busy += 1
        await self._work.put(work)

    async def _speak(self) -> None:
        while True:
            work = await self._work.get()
            try:
                await work()
            except LowvoxError as e:
                await self._write(Error(text=str(e), code=type(e).__name__).event())
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception:
                logger.exception("wyoming: a request failed")
                await self._write(Error(text="internal error", code="internal").event())
            finally:
                self._busy -= 1

    async def _write(self, event: Event) -> None:
        try:
            await asyncio.wait_for(async_write_event(event, self.writer), IDLE_TIMEOUT_S)
        except asyncio.TimeoutError as e:
            # Ends the connection, and with it the job (ConnectionError: the client is gone).
            logger.info(
                "wyoming: closing a connection that read nothing for %.0f s", IDLE_TIMEOUT_S
            )
            raise ConnectionError("the client reads nothing") from e

    # -- the work ----------------------------------------------------------------------

    async def _describe(self) -> None:
        await self._write((await build_info(self.hub)).event())

    async def _select(self, name: str) -> None:
        wanted = name.strip().lower().removeprefix("lowvox-")
        if wanted not in self.hub.names:
            raise UnknownEngine(name, list(self.hub.names))
        self.program = wanted

    async def _say_once(self, text: str, voice: SynthesizeVoice | None) -> None:
        try:
            target = await resolve_target(self.hub, voice, self.program)
            await self._say(text, target)
        except LowvoxError:
            if self._watch is None or self._watch.done():
                self._watch = asyncio.create_task(self._close_if_silent(self._events))
            raise

    async def _close_if_silent(self, seen: int) -> None:
        """End the connection if no event arrives within AFTER_ERROR_S of a failed one-shot
        synthesize (its `error` event is written meanwhile)."""
        await asyncio.sleep(AFTER_ERROR_S)
        if self._events == seen and not self._busy and self._reading is not None:
            logger.info("wyoming: closing a connection silent after its request failed")
            self._reading.cancel()  # `serve` then hangs up

    async def _say(self, text: str, target: Target) -> None:
        """Plan and queue one job as HTTP does, then send its audio as it is made:
        audio-start, audio-chunks (16-bit mono PCM), audio-stop."""
        plan = await synthesis.plan_job(
            self.hub,
            text=text,
            voice=target.voice,
            language=target.language,
            fmt="pcm",
            engine=target.engine,
        )
        job = synthesis.submit(plan, f"wyoming-{uuid.uuid4().hex[:12]}")
        rate = plan.sample_rate
        encoder = StreamEncoder("pcm", rate)
        started = False
        try:
            chunks = job.chunks()
            # The first audio before audio-start: a failure before any audio is then a
            # plain error event, not a cut stream.
            first = await anext(chunks, None)
            await self._write(AudioStart(rate=rate, width=SAMPLE_WIDTH, channels=1).event())
            started = True
            if first is not None:
                await self._send(encoder, first.samples, rate)
                async for chunk in chunks:
                    await self._send(encoder, chunk.samples, rate)
        except LowvoxError as e:
            # Failed or cancelled (/api/stop) after audio-start: clients read until
            # audio-stop, so end the audio before saying why.
            if started:
                await self._write(AudioStop().event())
            if plan.slot.retired and not isinstance(e, EngineRestarting):
                # Cut short by a reload or runtime change, not cancelled: say so (and when
                # to try again), as HTTP's 503 does.
                raise plan.slot.restarting() from e
            raise
        finally:
            if not job.finished.is_set():
                job.cancel.set()
        await self._write(AudioStop().event())

    async def _send(self, encoder: StreamEncoder, samples: Any, rate: int) -> None:
        # PCM is a clip and a cast: cheap enough for the event loop.
        audio = encoder.write(samples)
        if audio:
            chunk = WyomingChunk(rate=rate, width=SAMPLE_WIDTH, channels=1, audio=audio)
            await self._write(chunk.event())

    # -- streaming ---------------------------------------------------------------------

    async def _start_stream(self, voice: SynthesizeVoice | None) -> None:
        if self._stream is not None:
            await self._queue(lambda: self._fail("a stream is already open"))
            return
        stream = self._stream = _Stream(voice)
        await self._queue(lambda: self._open(stream))

    async def _add_text(self, text: str) -> None:
        stream = self._stream
        if stream is None:
            await self._queue(lambda: self._fail("synthesize-chunk outside a stream"))
            return
        complete, stream.text = add_text(stream.text, text)
        limit = self.state.settings.max_text_chars
        if len(stream.text) > limit:
            raise ProtocolError(f"over {limit} characters of text without a sentence end")
        if complete.strip():
            await self._queue(lambda: self._say_streamed(stream, complete))

    async def _stop_stream(self) -> None:
        stream = self._stream
        if stream is None:
            await self._queue(lambda: self._fail("synthesize-stop outside a stream"))
            return
        self._stream = None
        rest = stream.text
        if rest.strip():
            await self._queue(lambda: self._say_streamed(stream, rest))
        await self._queue(lambda: self._write(SynthesizeStopped().event()))

    async def _open(self, stream: _Stream) -> None:
        try:
            stream.target = await resolve_target(self.hub, stream.voice, self.program)
        except LowvoxError:
            stream.failed = True
            raise

    async def _say_streamed(self, stream: _Stream, text: str) -> None:
        if stream.failed or stream.target is None:
            return
        try:
            await self._say(text.strip(), stream.target)
        except LowvoxError:
            stream.failed = True
            raise

    async def _fail(self, message: str) -> None:
        await self._write(Error(text=message, code="protocol").event())


async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: Error) -> None:
    """Say why, then close. What the client is still sending is read and dropped for a
    moment first: closing with unread data resets the connection, and the client would lose
    the error before reading it."""

    async def say_why() -> None:
        await async_write_event(error.event(), writer)
        if writer.can_write_eof():
            writer.write_eof()
        while await reader.read(64 * 1024):
            pass

    with contextlib.suppress(Exception):
        # Bounded as a whole: a client that reads nothing blocks the write itself.
        await asyncio.wait_for(say_why(), LINGER_S)
    await hang_up(writer)


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Close the connection. Closing waits until what is still unsent is taken: a client
    that takes nothing for LINGER_S loses it, rather than holding the connection (and a
    server that is stopping) for ever."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), LINGER_S)
    except Exception:  # timed out, or the client reset the connection
        pass
    finally:
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("text is not a string")
    return value


def _voice(voice: SynthesizeVoice | None) -> SynthesizeVoice | None:
    fields = (voice.name, voice.language, voice.speaker) if voice is not None else ()
    if any(f is not None and not isinstance(f, str) for f in fields):
        raise TypeError("voice fields are not strings")
    return voice


# -- the server ----------------------------------------------------------------------------


class WyomingServer:
    """The Wyoming TCP server: accepts up to `max_connections` clients at once."""

    def __init__(
        self,
        state: ServerState,
        host: str,
        port: int,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._refused: set[asyncio.Task] = set()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.port, limit=HEADER_LIMIT
            )
        except OSError as e:
            raise LowvoxError(f"cannot listen for Wyoming on {self.host}:{self.port}: {e}") from e
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("Wyoming (Home Assistant) on tcp://%s:%d", self.host, self.port)
        if self.host not in _LOCAL_HOSTS:
            # Wyoming has no authentication: api_key guards HTTP only.
            logger.warning(
                "Wyoming listens on %s without authentication%s: anyone on the network can use it",
                self.host,
                " (the API key guards HTTP only)" if self.state.settings.api_key else "",
            )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [*self._tasks, *self._refused]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        full = len(self._tasks) >= self.max_connections
        # Refused clients are tracked apart: they linger a moment but are not connections.
        tasks = self._refused if full else self._tasks
        tasks.add(task)
        try:
            if full:
                logger.warning("wyoming: refusing a client: %d connections open", len(self._tasks))
                text = f"too many connections ({self.max_connections}); try again later"
                await refuse(reader, writer, Error(text=text, code="busy"))
            else:
                await Connection(self.state, reader, writer).serve()
        except asyncio.CancelledError:
            # Only stop() cancels a connection; ending quietly keeps asyncio's stream
            # callback, which asks the task for its exception, from logging one.
            pass
        except Exception:
            logger.exception("wyoming: a connection failed")
        finally:
            tasks.discard(task)


# -- zeroconf ------------------------------------------------------------------------------


class Announcer:
    """Announces the server as `_wyoming._tcp` over mDNS, so Home Assistant discovers it.

    The `zeroconf` package is optional (`pip install lowvox[zeroconf]`); without it, or when
    the announcement fails, the server runs undiscovered and says so once.
    """

    SERVICE = "_wyoming._tcp.local."

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._zeroconf: Any = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        try:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
        except ImportError:
            logger.warning(
                "zeroconf is not installed (pip install lowvox[zeroconf]): Home Assistant "
                "will not discover lowvox; add it by host and port"
            )
            return
        try:
            address = announce_address(self.host)
            ip = ipaddress.ip_address(address)
            local = ip.is_loopback or self.host not in ("0.0.0.0", "::", "")
            # A bound address is announced on its own interface; a wildcard on all of them.
            version = IPVersion.V6Only if ip.version == 6 else IPVersion.V4Only
            self._zeroconf = (
                AsyncZeroconf(interfaces=[address], ip_version=version)
                if local
                else AsyncZeroconf(ip_version=version)
            )
            name = f"lowvox-{socket.gethostname().split('.')[0]}"
            info = AsyncServiceInfo(
                self.SERVICE,
                f"{name}.{self.SERVICE}",
                addresses=[ip.packed],
                port=self.port,
                server=f"{name}.local.",
            )
        except (OSError, ValueError) as e:
            logger.warning("zeroconf: cannot announce Wyoming: %s", e)
            return
        if ip.is_loopback:
            logger.warning(
                "zeroconf: announcing %s, which only this machine can reach (--listen to be "
                "found on the network)",
                address,
            )
        self._task = asyncio.create_task(self._register(info))

    async def _register(self, info: Any) -> None:
        # Registration probes the network for a second or two: not worth delaying start-up.
        try:
            done = await self._zeroconf.async_register_service(info, allow_name_change=True)
            await done
            where = ", ".join(info.parsed_addresses())
            logger.info("zeroconf: announced %s at %s port %d", info.name, where, self.port)
        except Exception as e:
            logger.warning("zeroconf: announcing Wyoming failed: %s", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf.async_unregister_all_services()
            await self._zeroconf.async_close()
            self._zeroconf = None


def announce_address(host: str) -> str:
    """The address other machines reach the server at: the bound one, or for a wildcard the
    one this machine would use towards the mDNS group."""
    if host not in ("0.0.0.0", "::", ""):
        return str(socket.getaddrinfo(host, None)[0][4][0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("224.0.0.251", 5353))  # UDP connect sends nothing: it only picks a route
        return s.getsockname()[0]
