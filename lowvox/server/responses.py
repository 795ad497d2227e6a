"""From a queued job to bytes on the wire: streamed as the audio is made, or whole.

Audio is encoded as its chunks arrive (`lowvox.audio.encode`), never collected first. A
streamed answer goes through a spool, in memory up to `response_memory_bytes` and then in
an unnamed temporary file, which the job fills as fast as the engine makes audio and the
client empties at its own pace: a slow or idle reader holds disk, not memory, and never
holds up the batch. A whole-file answer (`"stream": false`, xtts-api-server's
tts_to_audio) is the same encoding into a spooled file, sent with its exact length once
complete. Files kept in the outputs folder are written while they are spoken and
published only when complete as files; a stream's copy, whose URL goes out with its
headers, is published even when the stream is cut short, holding the audio made before
the cut. A client that leaves cancels its job, with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lowvox.audio.formats import get_format
from lowvox.errors import Cancelled, LowvoxError
from lowvox.files import atomic_path, why_not_written
from lowvox.server.scheduler import Job, Priority
from lowvox.server.state import Generation, ServerState
from lowvox.server.synthesis import Plan, media_type, output_url, request_tag, submit

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How often a request waiting for audio checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25
# What a response reads from its encoded audio per send.
_READ_BLOCK = 64 * 1024


def _encoder_module() -> ModuleType:
    # Imported lazily: PyAV loads only once audio is encoded.
    from lowvox.audio import encode

    return encode


class ClientLeft(Cancelled):
    """The client went away before its answer was ready."""

    def __init__(self) -> None:
        super().__init__("the client went away")


def _failure(plan: Plan, error: BaseException) -> BaseException:
    """What a client is told about a job that ended without its audio: a job cut short by
    its engine's restart is that restart (503, Retry-After), not a cancellation."""
    if isinstance(error, LowvoxError) and not isinstance(error, ClientLeft) and plan.slot.retired:
        return plan.slot.restarting()
    return error


async def until_done_or_gone(aw: Awaitable[T], job: Job, request: Request | None) -> T:
    """Await `aw`, checking every 0.25 s that the client is still there. A client that
    leaves cancels its job (its row leaves the batch; a waiting job leaves the queue) and
    the wait ends at once, with one log line."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if request is not None and await request.is_disconnected():
                logger.info("client left; job %d cancelled", job.id)
                job.cancel.set()
                raise ClientLeft()
    finally:
        if not task.done():
            job.cancel.set()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a pool thread (encoding is CPU work). If the caller is cancelled
    meanwhile, the call still finishes before the cancellation goes on, so an encoder and
    its file are never touched by two threads, nor closed under a running call."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _cheap(fmt: str, out_rate: int | None, rate: int) -> bool:
    # 16-bit PCM at the engine's rate is a clip and a cast: no thread hop needed.
    return fmt in ("wav", "pcm") and (out_rate is None or out_rate == rate)


class Framing(Protocol):
    """How a stream wraps its encoded audio, for an API that sends events rather than bare
    bytes (OpenAI's `stream_format: "sse"`)."""

    media_type: str

    def delta(self, data: bytes) -> bytes:
        """What goes out for a block of encoded audio."""
        ...

    def end(self, error: BaseException | None) -> bytes:
        """What ends the stream: complete (`error` None), or cut short by `error`."""
        ...


class _Discarded(Exception):
    """Passed to `atomic_path` to make it drop an unfinished file."""


class _PartFile:
    """A file being written while audio arrives, through the one atomic-write helper:
    published under its name only once complete, removed when not."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._settled = False  # published, or its temporary removed
        self._atomic = atomic_path(path, fsync=False)
        temporary = self._atomic.__enter__()
        try:
            self.file = open(temporary, "wb")  # noqa: SIM115 -- closed by publish/discard
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise

    def publish(self) -> None:
        """Publish the file; when that fails, `discard` still removes the temporary."""
        self.file.close()
        self._settled = True
        self._atomic.__exit__(None, None, None)

    def discard(self) -> None:
        if self._settled:
            return
        self._settled = True
        with contextlib.suppress(OSError):  # a full disk fails the last flush as well
            self.file.close()
        self._atomic.__exit__(_Discarded, _Discarded(), None)


def _not_saved(path: Path, error: BaseException) -> BaseException:
    """What a client is told when its audio could not be written to `path`: why (a full
    disk, say), rather than an internal server error."""
    if isinstance(error, OSError):
        return LowvoxError(f"cannot save {path.name} ({why_not_written(error)})")
    return error


class _KeptCopy:
    """The saved copy of a stream, written as its audio is sent. Its URL went out with the
    stream's headers (`X-Output-File-Url`), so however the stream ends the copy is
    published: whole, or, for a stream cut short (the client left, a cancel, an engine
    error), complete as a file and holding the audio made before the cut. Only a copy
    with no audio yet, or one whose own writing failed, is dropped. The encoder's calls
    run on a pool thread."""

    def __init__(self, path: Path, fmt: str, rate: int, out_rate: int | None) -> None:
        self.part = _PartFile(path)
        try:
            self.encoder = _encoder_module().FileEncoder(fmt, rate, self.part.file, out_rate)
        except BaseException:
            self.part.discard()
            raise
        self.audio = False  # whether any audio reached the file
        self.broken = False  # whether writing it failed
        self.settled = False  # published or dropped

    def write(self, samples: np.ndarray) -> None:
        try:
            self.encoder.write(samples)
        except BaseException:
            self.broken = True
            raise
        self.audio = True

    def publish(self, *, cut: bool) -> bool:
        """Complete the file and publish it (once); whether it was. A cut copy without
        audio, or one that cannot be completed, is dropped instead."""
        if self.settled:
            return False
        self.settled = True
        if self.broken or (cut and not self.audio):
            with contextlib.suppress(Exception):  # only to free it: the file is dropped
                self.encoder.close()
            self.part.discard()
            return False
        try:
            self.encoder.close()
            self.part.publish()
        except BaseException:
            self.part.discard()
            raise
        return True


async def _render(
    plan: Plan, job: Job, request: Request | None, file: Any, out_rate: int | None
) -> None:
    """A job's audio as one complete file written into `file` while it is made (never
    held whole in memory); the client leaving cancels the job."""
    fmt, rate = plan.fmt, plan.sample_rate
    encoder = _encoder_module().FileEncoder(fmt, rate, file, out_rate)
    cheap = _cheap(fmt, out_rate, rate)

    async def run() -> None:
        async for chunk in job.chunks():
            if cheap:
                encoder.write(chunk.samples)
            else:
                await _off_loop(encoder.write, chunk.samples)
        await _off_loop(encoder.close)

    try:
        await until_done_or_gone(run(), job, request)
    except BaseException as e:
        failure = _failure(plan, e)
        if failure is e:
            raise
        raise failure from e
    finally:
        if not job.finished.is_set():
            job.cancel.set()


async def render_file(
    plan: Plan,
    path: Path,
    request: Request | None = None,
    tag: str = "",
    priority: Priority = Priority.INTERACTIVE,
) -> None:
    """Speak a planned job into the file at `path`, published only once it is complete."""
    part = _PartFile(path)
    try:
        job = submit(plan, tag or request_tag(request), priority)
        await _render(plan, job, request, part.file, None)
        await _off_loop(part.publish)
    except BaseException as e:
        part.discard()
        failure = _not_saved(path, e)
        if failure is e:
            raise
        raise failure from e


async def save(
    state: ServerState, plan: Plan, request: Request, hint: str, *, timestamp: bool = True
) -> str:
    """Speak a planned job into the outputs folder; returns the file's name. For the APIs
    that answer with where the audio is (AllTalk, xtts-api-server's tts_to_file)."""
    name = state.outputs.new_name(hint, plan.fmt, timestamp)
    await render_file(plan, state.outputs.path_for(name), request)
    await asyncio.to_thread(state.outputs.enforce_retention, name)
    _remember(state, plan, name)
    return name


def _remember(state: ServerState, plan: Plan, name: str) -> None:
    state.remember(
        Generation(
            file=name,
            url=output_url(state.settings, "/audio", name),
            engine=plan.slot.name,
            voice=plan.segments[0].voice,
            text=" ".join(s.text for s in plan.segments)[:200],
        )
    )


class _Spool:
    """Encoded bytes on their way from a job to its client: in memory up to `memory`
    bytes, then in an unnamed temporary file. The job is drained as fast as the engine
    makes audio whatever the client does, so a slow or idle reader holds disk, not
    memory, and never holds up the batch. Used on the event loop only."""

    def __init__(self, state: ServerState) -> None:
        self.file = _spooled_file(state)
        self.size = 0
        self.audio = False  # whether any of the job's audio has been encoded
        self.done = False
        self.error: BaseException | None = None
        self.changed = asyncio.Event()

    def append(self, data: bytes) -> None:
        if data:
            self.file.seek(0, os.SEEK_END)
            self.file.write(data)
            self.size += len(data)
        self.changed.set()

    def finish(self) -> None:
        self.done = True
        self.changed.set()

    def read(self, offset: int, size: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(size)

    async def wait(self) -> None:
        self.changed.clear()
        await self.changed.wait()

    def close(self) -> None:
        self.file.close()


def _spooled_file(state: ServerState) -> Any:
    """A temporary file in memory up to `response_memory_bytes`, then on disk (unnamed:
    nothing is left behind)."""
    folder = state.settings.cache_path / "responses"
    folder.mkdir(parents=True, exist_ok=True)
    memory = state.settings.response_memory_bytes
    if memory <= 0:  # SpooledTemporaryFile takes 0 to mean "never on disk"
        return tempfile.TemporaryFile(dir=str(folder))
    return tempfile.SpooledTemporaryFile(max_size=memory, dir=str(folder))


async def _streamed(
    state: ServerState,
    plan: Plan,
    job: Job,
    request: Request,
    headers: dict[str, str],
    name: str | None,
    out_rate: int | None,
    framing: Framing | None = None,
) -> Response:
    fmt, rate = plan.fmt, plan.sample_rate
    stream_encoder = _encoder_module().StreamEncoder(fmt, rate, out_rate)
    kept = _KeptCopy(state.outputs.path_for(name), fmt, rate, out_rate) if name else None
    try:
        spool = _Spool(state)
    except BaseException:
        if kept is not None:
            kept.part.discard()
        raise
    cheap = _cheap(fmt, out_rate, rate) and kept is None

    def on_chunk(samples: np.ndarray) -> bytes:
        if kept is not None:
            kept.write(samples)
        return stream_encoder.write(samples)

    async def keep(cut: bool) -> None:
        if kept is None or name is None:
            return
        if await _off_loop(functools.partial(kept.publish, cut=cut)):
            await asyncio.to_thread(state.outputs.enforce_retention, name)
            _remember(state, plan, name)

    async def pump() -> None:
        try:
            async for chunk in job.chunks():
                data = (
                    on_chunk(chunk.samples) if cheap else await _off_loop(on_chunk, chunk.samples)
                )
                spool.audio = True
                spool.append(data)
            tail = await _off_loop(stream_encoder.close)
            await keep(cut=False)  # before the stream's end: its URL works once it ends
            spool.append(tail)
        except BaseException as e:
            spool.error = e
            try:
                await keep(cut=True)
            except Exception as failed:  # noqa: BLE001 -- logged; the stream's own error stands
                logger.warning("could not keep %s: %s", name, failed)
            # Frees its FFmpeg objects now: this frame stays in a reference cycle (through
            # `spool.error`) until the garbage collector finds it.
            with contextlib.suppress(Exception):
                await _off_loop(stream_encoder.close)
            if not isinstance(e, Exception):
                raise
        finally:
            spool.finish()
            if not job.finished.is_set():
                job.cancel.set()

    task = asyncio.create_task(pump())
    stopping = False

    async def stop() -> None:
        """Cancel the job and the pump, then wait for the pump to finish (its kept copy
        included). The pump is cancelled once only, and never by a waiter that is itself
        cancelled (as a response's task is, again and again, once its client has left):
        a second cancel would cut the copy's publishing short."""
        nonlocal stopping
        if not job.finished.is_set():
            job.cancel.set()
        if not stopping and not task.done():
            stopping = True
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(task)

    async def first_audio() -> None:
        while not (spool.audio or spool.done):
            await spool.wait()

    try:
        # A failure before any audio keeps its status code (the headers are not sent yet).
        await until_done_or_gone(first_audio(), job, request)
        if spool.error is not None and not spool.audio:
            failure = _failure(plan, spool.error)
            if failure is spool.error:
                raise failure
            raise failure from spool.error
    except BaseException:
        await stop()
        spool.close()
        raise

    async def cleanup() -> None:
        await stop()
        spool.close()

    async def body() -> AsyncIterator[bytes]:
        offset = 0
        sent = False
        try:
            while True:
                if offset < spool.size:
                    data = spool.read(offset, _READ_BLOCK)
                    offset += len(data)
                    yield framing.delta(data) if framing is not None else data
                elif spool.done:
                    break
                else:
                    await spool.wait()
            sent = True
            if spool.error is not None:
                # The headers are gone: all a client can be told is that the stream ends
                # (or, in a stream of events, an event saying why).
                logger.warning("stream of job %d ended early: %s", job.id, spool.error)
            if framing is not None:
                yield framing.end(spool.error)
        finally:
            if not sent:
                logger.info("client left mid-stream; job %d cancelled", job.id)
            await cleanup()

    sent_type = framing.media_type if framing is not None else media_type(fmt)
    return JobStream(body(), job, cleanup, media_type=sent_type, headers=headers)


class JobStream(StreamingResponse):
    """A streaming response that cancels its job however the response ends, and runs
    `cleanup` even when its body was never started (a client gone before the headers)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        job: Job,
        cleanup: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        headers.setdefault("X-Accel-Buffering", "no")
        headers.setdefault("Cache-Control", "no-cache")
        super().__init__(content, headers=headers, **kwargs)
        self.job = job
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                self.job.cancel.set()
            if self.cleanup is not None:
                await self.cleanup()


class FileBody(StreamingResponse):
    """A finished file sent in blocks with its Content-Length: the client's pace decides
    how fast it goes, and nothing but one block is in memory for it."""

    def __init__(self, file: Any, size: int, **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        headers["Content-Length"] = str(size)
        super().__init__(self._blocks(file, size), headers=headers, **kwargs)
        self.file = file

    @staticmethod
    async def _blocks(file: Any, size: int) -> AsyncIterator[bytes]:
        file.seek(0)
        left = size
        while left > 0:
            data = await _off_loop(file.read, min(_READ_BLOCK, left))
            if not data:
                break
            left -= len(data)
            yield data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.file.close()


async def _whole(
    state: ServerState,
    plan: Plan,
    job: Job,
    request: Request,
    headers: dict[str, str],
    name: str | None,
    out_rate: int | None,
) -> Response:
    if name:
        part = _PartFile(state.outputs.path_for(name))
        try:
            await _render(plan, job, request, part.file, out_rate)
            # Opened before it is published: from then on a retention sweep (by the size
            # limit) may remove it at any time, and the answer is still sent whole.
            file: Any = await asyncio.to_thread(open, part.file.name, "rb")
            try:
                await _off_loop(part.publish)
            except BaseException:
                file.close()
                raise
        except BaseException as e:
            part.discard()
            failure = _not_saved(part.path, e)
            if failure is e:
                raise
            raise failure from e
        await asyncio.to_thread(state.outputs.enforce_retention, name)
        _remember(state, plan, name)
        size = os.fstat(file.fileno()).st_size
    else:
        file = _spooled_file(state)  # closed by FileBody
        try:
            await _render(plan, job, request, file, out_rate)
        except BaseException:
            file.close()
            raise
        size = file.tell()
    return FileBody(file, size, media_type=media_type(plan.fmt), headers=headers)


async def respond(
    state: ServerState,
    plan: Plan,
    request: Request,
    *,
    stream: bool,
    save_hint: str | None = None,
    timestamp: bool = True,
    out_rate: int | None = None,
    framing: Framing | None = None,
) -> Response:
    """Run a planned job and answer with its audio, resampled to `out_rate` when the API
    fixes one: streamed as it is made (when the format can be), or as a whole file with
    its exact length. Either way the audio is encoded as it arrives and held in memory
    only up to `response_memory_bytes`. A stream with `framing` sends its audio wrapped
    in the API's events (the caller makes sure the format streams).

    With `save_hint` the audio is also written to the outputs folder, streamed or not, and
    `X-Output-File-Url` tells where it will be; a stream cut short (the client left, a
    cancel) leaves there what it had made (`_KeptCopy`).
    """
    fmt, rate = plan.fmt, plan.sample_rate
    stream = stream and get_format(fmt).streamable
    name = state.outputs.new_name(save_hint, fmt, timestamp) if save_hint else None
    tag = request_tag(request)
    sent_rate = _encoder_module().output_rate(fmt, out_rate or rate)
    headers = {"X-Sample-Rate": str(sent_rate), "X-Request-Id": tag}
    if name:
        headers["X-Output-File-Url"] = output_url(state.settings, "/audio", name)
        headers["X-Output-File"] = name
    job = submit(plan, tag)
    try:
        if stream:
            return await _streamed(state, plan, job, request, headers, name, out_rate, framing)
        return await _whole(state, plan, job, request, headers, name, out_rate)
    except BaseException:
        job.cancel.set()  # nobody will read what it makes
        raise
