"""Long-form jobs over HTTP: `/api/jobs`.

Create a job from an uploaded file (multipart `file` plus the same fields as the JSON
form) or from JSON text; list and inspect jobs (progress, chapters, flagged sentences);
follow progress as Server-Sent Events; pause, resume, cancel, delete; download the book,
a chapter, or the subtitles; retake or edit one sentence (the book is re-baked, nothing
else is spoken again). The API key and limits are the rest of the server's.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.datastructures import UploadFile

from lowvox.audio.formats import FORMATS
from lowvox.engines.base import check_voice_name
from lowvox.errors import InvalidRequest
from lowvox.jobs.options import JobOptions, SentenceEdit, job_settings, parse_job_options
from lowvox.jobs.runner import subtitle_paths
from lowvox.jobs.service import JobService
from lowvox.jobs.store import JobInfo, JobSettings, by_chapter
from lowvox.server.routes.paths import TolerantRoute, read_form, read_json
from lowvox.server.routes.voices import PayloadTooLarge
from lowvox.server.state import State

router = APIRouter(prefix="/api/jobs", tags=["jobs"], route_class=TolerantRoute)

# A sentence number as a path parameter: bounded, so no database integer overflows.
SentenceIndex = Annotated[int, Path(ge=0, le=2**31 - 1)]
_TERMINAL = ("done", "failed", "cancelled")
# Server-Sent Events: a comment line this often keeps proxies from closing the stream.
_SSE_HEARTBEAT_S = 15.0


def _service(state: Any) -> JobService:
    return state.jobs


def _settings(state: Any, opts: JobOptions) -> JobSettings:
    return job_settings(
        opts,
        engine=state.hub.resolve_name(opts.engine),
        default_voice=state.settings.voice,
        default_language=state.settings.language,
        default_retakes=state.settings.job_retakes,
    )


def describe(state: Any, job: JobInfo, *, detail: bool = False) -> dict[str, Any]:
    store = _service(state).store
    progress = store.progress(job.id, job.sample_rate)
    out: dict[str, Any] = {
        "id": job.id,
        "title": job.title,
        "author": job.author,
        "state": job.state,
        "error": job.error,
        "created": job.created,
        "updated": job.updated,
        "engine": job.settings.engine,
        "voice": job.settings.voice,
        "language": job.language,
        "format": job.settings.format,
        "input": job.input_name,
        "progress": {
            "total": progress.total,
            "done": progress.done,
            "failed": progress.failed,
            "flagged": progress.flagged,
            "audio_seconds": round(progress.audio_seconds, 2),
            "fraction": round(progress.done / progress.total, 4) if progress.total else 0.0,
        },
        "url": f"/api/jobs/{job.id}",
    }
    if job.assembled is not None:
        out["downloads"] = {
            "book": f"/api/jobs/{job.id}/download",
            "srt": f"/api/jobs/{job.id}/download?part=srt",
            "vtt": f"/api/jobs/{job.id}/download?part=vtt",
        }
    if not detail:
        return out
    rate = job.sample_rate or 1
    sentences = store.sentences(job.id)
    grouped = by_chapter(sentences)
    chapters = []
    for i, title in enumerate(store.chapters(job.id)):
        mine = grouped.get(i)
        if not mine:
            continue
        entry: dict[str, Any] = {
            "index": i + 1,
            "title": title,
            "sentences": len(mine),
            "done": sum(s.state == "done" for s in mine),
            "audio_seconds": round(sum(s.samples or 0 for s in mine) / rate, 2),
            "first_sentence": mine[0].idx,
        }
        if job.assembled is not None:
            entry["url"] = f"/api/jobs/{job.id}/download?part=chapter&chapter={i + 1}"
        chapters.append(entry)
    out["chapters"] = chapters
    out["flagged"] = [sentence_json(job, s) for s in sentences if s.flags or s.state == "failed"][
        :500
    ]
    return out


def sentence_json(job: JobInfo, s: Any) -> dict[str, Any]:
    return {
        "index": s.idx,
        "chapter": s.chapter + 1,
        "paragraph": s.paragraph + 1,
        "text": s.text,
        "voice": s.voice,
        "state": s.state,
        "attempt": s.attempt,
        "seed": s.seed,
        "flags": list(s.flags),
        "score": s.score,
        "error": s.error,
        "audio_url": f"/api/jobs/{job.id}/sentences/{s.idx}/audio" if s.state == "done" else None,
    }


async def _read_create(request: Request, state: Any) -> tuple[JobOptions, bytes, str]:
    """The options, the input's bytes and its file name, from JSON or a multipart upload."""
    limit = state.settings.max_job_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise PayloadTooLarge(f"the upload is {declared} bytes, over the job limit of {limit}")
    ctype = request.headers.get("content-type", "")
    if "multipart/form-data" in ctype:
        form = await read_form(request, "could not read the upload", max_files=1, max_fields=40)
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str) and v != ""}
        opts = parse_job_options(fields)
        if isinstance(upload, UploadFile):
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise PayloadTooLarge(f"the file is over the job limit of {limit} bytes")
            name = (upload.filename or "upload.txt").replace("\\", "/").rsplit("/", 1)[-1]
            return opts, data, name or "upload.txt"
    else:
        body = await read_json(request, "send JSON with `text`, or a multipart upload with `file`")
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        opts = parse_job_options(body)
    if not opts.text or not opts.text.strip():
        raise InvalidRequest("give `text` or upload a `file`", field="text")
    try:
        data = opts.text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, from a broken \u escape in the JSON
        raise InvalidRequest(
            f"the text is not valid Unicode: a lone surrogate at character {e.start}",
            field="text",
        ) from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the text is over the job limit of {limit} bytes", field="text")
    return opts, data, "text.md" if opts.markdown else "text.txt"


def _upload_schema() -> dict[str, Any]:
    schema = JobOptions.model_json_schema()
    form = {
        **schema,
        "properties": {**schema["properties"], "file": {"type": "string", "format": "binary"}},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": form},
            },
        }
    }


@router.post("", status_code=201, openapi_extra=_upload_schema())
async def create(request: Request, state: State) -> dict:
    """A new job from JSON `text` or an uploaded `file` (.txt, .md, .epub)."""
    opts, data, name = await _read_create(request, state)
    settings = _settings(state, opts)
    job = await _service(state).create(
        data=data, filename=name, settings=settings, title=opts.title
    )
    return {"job": await asyncio.to_thread(describe, state, job, detail=True)}


@router.get("")
async def list_jobs(state: State) -> dict:
    jobs = await asyncio.to_thread(_service(state).store.jobs, origin="server")
    return {"jobs": [await asyncio.to_thread(describe, state, j) for j in reversed(jobs)]}


@router.get("/{job_id}")
async def get_job(job_id: str, state: State) -> dict:
    job = await _service(state).get(job_id)
    return {"job": await asyncio.to_thread(describe, state, job, detail=True)}


@router.get("/{job_id}/sentences")
async def sentences(
    job_id: str,
    state: State,
    chapter: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    flagged: bool = False,
) -> dict:
    service = _service(state)
    job = await service.get(job_id)
    rows = await asyncio.to_thread(
        service.store.sentences, job_id, chapter=None if chapter is None else chapter - 1
    )
    if flagged:
        rows = [s for s in rows if s.flags or s.state == "failed"]
    return {"sentences": [sentence_json(job, s) for s in rows[:5000]]}


@router.get("/{job_id}/events")
async def events(job_id: str, request: Request, state: State) -> StreamingResponse:
    """Progress as Server-Sent Events: a `progress` event now and after every sentence,
    until the job is done, failed or cancelled (or the client leaves)."""
    service = _service(state)
    job = await service.get(job_id)
    queue = service.events.subscribe(job_id)

    async def stream() -> AsyncIterator[bytes]:
        try:
            snapshot = await asyncio.to_thread(describe, state, job)
            yield _sse("progress", snapshot)
            if job.state in _TERMINAL:
                return
            while not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(queue.get(), _SSE_HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                data = event.as_dict()
                data = {k: _finite(v) for k, v in data.items()}
                yield _sse("progress", data)
                if event.state in _TERMINAL:
                    return
        finally:
            service.events.unsubscribe(job_id, queue)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.post("/{job_id}/pause")
async def pause(job_id: str, state: State) -> dict:
    job = await _service(state).pause(job_id)
    return {"job": await asyncio.to_thread(describe, state, job)}


@router.post("/{job_id}/resume")
async def resume(job_id: str, state: State) -> dict:
    job = await _service(state).resume(job_id)
    return {"job": await asyncio.to_thread(describe, state, job)}


@router.post("/{job_id}/cancel")
async def cancel(job_id: str, state: State) -> dict:
    job = await _service(state).cancel(job_id)
    return {"job": await asyncio.to_thread(describe, state, job)}


@router.delete("/{job_id}")
async def delete(job_id: str, state: State) -> dict:
    await _service(state).delete(job_id)
    return {"deleted": job_id}


@router.post("/{job_id}/sentences/{index}/retake")
async def retake(
    job_id: str, index: SentenceIndex, state: State, edit: SentenceEdit | None = None
) -> dict:
    """Another take of one sentence (new seed), with new text or voice if given; the book
    is assembled again once it is spoken."""
    text = edit.text if edit else None
    if text is not None and not text.strip():
        raise InvalidRequest("the new text is empty", field="text")
    voice = check_voice_name(edit.voice) if edit else None
    job = await _service(state).retake(job_id, index, text=text, voice=voice)
    return {"job": await asyncio.to_thread(describe, state, job)}


@router.get("/{job_id}/sentences/{index}/audio")
async def sentence_audio(job_id: str, index: SentenceIndex, state: State) -> FileResponse:
    store = _service(state).store
    sentence = await asyncio.to_thread(store.sentence, job_id, index)
    path = store.audio_path(job_id, index)
    if sentence.state != "done" or not path.is_file():
        raise InvalidRequest(f"sentence {index} has no audio yet", field="sentence")
    return FileResponse(path, media_type="audio/flac", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/download")
async def download(
    job_id: str,
    state: State,
    part: Literal["book", "chapter", "srt", "vtt"] = "book",
    chapter: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
) -> FileResponse:
    service = _service(state)
    job = await service.get(job_id)
    if part == "chapter":
        if chapter is None or chapter < 1:
            raise InvalidRequest("give the chapter number: ?part=chapter&chapter=3")
        path = await service.chapter(job_id, chapter - 1)
    else:
        book = await service.book(job_id)
        path = {"book": book, "srt": subtitle_paths(book)[0], "vtt": subtitle_paths(book)[1]}[part]
    suffix = path.suffix.lstrip(".")
    media = {
        "srt": "application/x-subrip",
        "vtt": "text/vtt",
        "m4b": "audio/mp4",
    }.get(suffix) or (
        FORMATS[suffix].media_type if suffix in FORMATS else "application/octet-stream"
    )
    stem = re.sub(r"[^\w\- ]+", "", job.title).strip()[:80] or "book"
    name = f"{stem} - chapter {chapter}" if part == "chapter" else stem
    return FileResponse(path, media_type=media, filename=f"{name}.{suffix}")
