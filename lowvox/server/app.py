"""The FastAPI application: app factory, lifespan and `serve`.

`create_app(settings)` builds everything from one Settings object (no module-level state);
the lifespan removes what a killed server left half-written, loads and warms up the
default engine on its own worker thread, starts the outputs retention sweep (and, with
`wyoming`, the Wyoming server for Home Assistant), and stops them and the engines on
shutdown. `server_config` is how uvicorn runs it: timeouts, a connection limit, and API
keys kept out of the access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import lowvox
from lowvox.engines import create_engine
from lowvox.errors import LowvoxError
from lowvox.files import PARTIAL_GLOB, sweep_partials
from lowvox.jobs.service import JobService
from lowvox.server.engines import EngineFactory, EngineHub
from lowvox.server.errors import install_error_handlers
from lowvox.server.outputs import OutputStore
from lowvox.server.routes import alltalk, core, jobs, openai, voices, web, xtts_api
from lowvox.server.scheduler import Priority
from lowvox.server.security import (
    MAX_HEADER_BYTES,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    RedactApiKeys,
    SiteGuardMiddleware,
    guarded_protocol,
    host_names,
)
from lowvox.server.state import ServerState
from lowvox.settings import Settings
from lowvox.voices.store import MAX_CLIPS, VoiceStore

if TYPE_CHECKING:
    import uvicorn

    from lowvox.server.wyoming import Announcer, WyomingServer

logger = logging.getLogger(__name__)

# How often the retention sweep runs while the server is up.
RETENTION_INTERVAL_S = 60.0

# The CLI (`lowvox say`, `lowvox bench`) may be writing the weights cache while the server
# starts: only temporaries older than this are a dead writer's.
CACHE_SWEEP_AGE_S = 3600.0

# Body limits: text routes take the longest text, each character escaped (`\ud83d\ude00` is
# 12 bytes for one); the upload routes take their files. Plus room for the other fields.
BYTES_PER_TEXT_CHAR = 12
BODY_SLACK = 64 * 1024

# Headers a browser script may read from our responses.
EXPOSED_HEADERS = [
    "X-Output-File-Url", "X-Output-File", "X-Sample-Rate", "X-Request-Id", "Retry-After",
]  # fmt: skip


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app. `engine_factory(name, settings) -> Engine` replaces the registry (tests)."""
    hub = EngineHub(settings, engine_factory) if engine_factory else EngineHub(settings)
    state = ServerState(
        settings=settings,
        hub=hub,
        outputs=OutputStore(
            settings.outputs_path, settings.outputs_max_age_hours, settings.outputs_max_bytes
        ),
        voices=VoiceStore(settings.voices_path, settings.max_upload_bytes),
        jobs=JobService(settings, hub),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _sweep_leftovers(settings)
        try:
            await hub.get(None, warmup=True)
        except LowvoxError as e:
            logger.error("cannot start the %s engine: %s", hub.default, e)
            raise
        logger.info(
            "lowvox is ready: http://%s:%d/ (engine %s; Ctrl-C stops it)",
            settings.host,
            settings.port,
            hub.default,
        )
        # Announcing the Wyoming server implies running it.
        wyoming_on = settings.wyoming or settings.wyoming_zeroconf
        wyoming = await _start_wyoming(state) if wyoming_on else None
        # Jobs the server was running when it stopped (or was killed) resume now.
        await state.jobs.start()
        tasks = [asyncio.create_task(_retention_loop(state.outputs))]
        if settings.keep_alive > 0:
            tasks.append(asyncio.create_task(_keep_alive_loop(hub, settings.keep_alive)))
        try:
            yield
        finally:
            if wyoming is not None:
                await _stop_wyoming(*wyoming)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.jobs.close()
            await hub.close()

    app = FastAPI(
        title="lowvox",
        version=lowvox.__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.lowvox = state
    app.state.settings = settings
    install_error_handlers(app)

    # The static files first: every /static/ path is theirs, as the API key check (which
    # leaves them open) assumes. After the routes, AllTalk's `/{address}/audio/{name}`
    # would answer /static/audio/<name> for a client naming its Host "static".
    web.mount_static(app)
    app.include_router(core.router)
    app.include_router(openai.router)
    app.include_router(alltalk.router)
    app.include_router(xtts_api.router)
    app.include_router(voices.router)
    app.include_router(jobs.router)
    app.include_router(web.router)

    # Order matters: the last middleware added runs first. The Host and Origin checks come
    # first; CORS must answer preflights before the key check (browsers send no
    # credentials on a preflight); the body limits apply to requests let in.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=body_limit(settings),
        routes=upload_limits(settings),
        timeout=settings.body_timeout,
    )
    if settings.api_key:
        app.add_middleware(
            ApiKeyMiddleware, api_key=settings.api_key, trusted_networks=settings.trusted_networks
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            allow_credentials=False,
            **_private_network_option(),
        )
    app.add_middleware(
        SiteGuardMiddleware,
        hosts=host_names(settings.host, settings.public_url, settings.allowed_hosts),
        origins=settings.cors_origins,
        public_url=settings.public_url,
    )
    return app


def _private_network_option() -> dict[str, Any]:
    # Chrome's Private Network Access (a page elsewhere calling a server on this machine or
    # the LAN) needs one more preflight header, which only newer Starlette releases send.
    params = inspect.signature(CORSMiddleware.__init__).parameters
    return {"allow_private_network": True} if "allow_private_network" in params else {}


def body_limit(settings: Settings) -> int:
    """The largest body a route other than an upload reads: the longest text, escaped."""
    return settings.max_text_chars * BYTES_PER_TEXT_CHAR + BODY_SLACK


def upload_limits(settings: Settings) -> dict[tuple[str, str], int]:
    """The routes that take files, and the largest body each reads."""
    return {
        ("POST", "/api/library/voices"): settings.max_upload_bytes * MAX_CLIPS + BODY_SLACK,
        ("POST", "/api/jobs"): settings.max_job_bytes + BODY_SLACK,
    }


async def _sweep_leftovers(settings: Settings) -> None:
    """Remove what writers killed mid-write left behind (a crash, a power cut): unpublished
    outputs, half-made and half-deleted voices, cache temporaries. The job store sweeps
    its own folder when the job service starts."""
    sweeps: list[tuple[Path, float, tuple[str, ...]]] = [
        (settings.outputs_path, 0.0, (PARTIAL_GLOB,)),
        (settings.voices_path, 0.0, (PARTIAL_GLOB, ".upload-*", ".trash-*")),
        # `.tmp*`: safetensors' save_file (the weights cache) writes its own temporary.
        (settings.cache_path, CACHE_SWEEP_AGE_S, (PARTIAL_GLOB, "*.tmp", ".tmp*")),
    ]
    for folder, age, patterns in sweeps:
        removed = await asyncio.to_thread(sweep_partials, folder, age, patterns)
        if removed:
            logger.info("removed %d leftover temporary file(s) in %s", removed, folder)


# -- Home Assistant's Wyoming protocol: the same engines, on its own TCP port ----------------


async def _start_wyoming(state: ServerState) -> tuple[WyomingServer, Announcer | None]:
    try:  # imported only when asked for: HTTP alone runs without the package
        from lowvox.server.wyoming import Announcer, WyomingServer
    except ImportError as e:
        await state.hub.close()
        raise LowvoxError(f"--wyoming needs the wyoming package (pip install wyoming): {e}") from e
    settings = state.settings
    server = WyomingServer(state, settings.host, settings.wyoming_port)
    try:
        await server.start()
    except LowvoxError as e:
        # The app will not start: stop the engine already loaded for it.
        logger.error("%s", e)
        await state.hub.close()
        raise
    announcer = Announcer(settings.host, server.port) if settings.wyoming_zeroconf else None
    if announcer is not None:
        announcer.start()
    return server, announcer


async def _stop_wyoming(server: WyomingServer, announcer: Announcer | None) -> None:
    if announcer is not None:
        await announcer.stop()
    await server.stop()


async def _retention_loop(outputs: OutputStore) -> None:
    while True:
        try:
            await asyncio.to_thread(outputs.sweep_partials)
            await asyncio.to_thread(outputs.enforce_retention)
        except Exception:
            logger.exception("outputs retention sweep failed")
        await asyncio.sleep(RETENTION_INTERVAL_S)


async def _keep_alive_loop(hub: EngineHub, idle_seconds: float) -> None:
    while True:
        await asyncio.sleep(min(max(idle_seconds / 4, 0.05), 30.0))
        try:
            await hub.unload_idle(idle_seconds)
        except Exception:
            logger.exception("unloading idle engines failed")


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How uvicorn runs `app`: on settings.host:settings.port, with header and send
    timeouts, a connection limit, the socket's peer as the client, and keys redacted in
    access logs."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactApiKeys) for f in access_log.filters):
        access_log.addFilter(RedactApiKeys())
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Our logging is configured by the CLI; uvicorn keeps only its access log format.
        log_config=None,
        timeout_graceful_shutdown=5,
        http=guarded_protocol(
            AutoHTTPProtocol, settings.header_timeout, send_timeout=settings.send_timeout
        ),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.max_connections,
        # trusted_networks must see who is really connected, not what X-Forwarded-For says.
        proxy_headers=False,
    )


def make_server(config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server, which first ends the requests still speaking when it is asked to
    stop (SIGTERM, Ctrl-C). uvicorn waits for open responses before the application's own
    shutdown; a stream would run on until that wait's bound and then be killed mid-body
    with a traceback. Its job is cancelled instead: the stream ends cleanly with what it
    made. Long-form jobs are left to the application's shutdown (they resume later)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            state = getattr(getattr(self.config.app, "state", None), "lowvox", None)
            if isinstance(state, ServerState):
                cut = state.hub.cancel_all(Priority.INTERACTIVE)
                if cut:
                    logger.info("stopping: %d request(s) in progress cut short", cut)
            await super().shutdown(sockets)

    return Server(config)


def serve(settings: Settings) -> None:
    """Run the server in the foreground (blocking) on settings.host:settings.port."""

    # Constructing the default engine checks its files and libraries (no model loading), so
    # a missing model is a clean LowvoxError for the CLI rather than a failed lifespan.
    create_engine(settings.engine, settings)
    app = create_app(settings)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logger.warning(
            "listening on %s without an API key: anyone on the network can use it", settings.host
        )
    if settings.trusted_networks and not settings.api_key:
        logger.warning("trusted_networks does nothing without an api_key: no client needs one")
    # Bound before the engine loads: a port in use is one clear error at once, not a
    # "lowvox is ready" line followed by uvicorn's failure to bind.
    sock = _bind(settings.host, settings.port)
    with sock:
        make_server(server_config(app, settings)).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # in use, not this machine's address, an unknown name
        sock.close()
        raise LowvoxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock
