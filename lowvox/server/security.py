"""Request gatekeeping as plain ASGI middleware, outermost first:

- `SiteGuardMiddleware`: the Host header must be one of the server's names (DNS
  rebinding), and a browser request from another web page must come from an origin in
  `cors_origins` (a page elsewhere cannot drive the server, even with requests CORS lets
  through unread);
- `ApiKeyMiddleware`: the optional API key, from a header, the `?api_key=` query (scripts),
  the web page's session cookie, or a client on a trusted network;
- `BodyLimitMiddleware`: per-route body size limits and a timeout while a body arrives.

Below the ASGI layer, `guarded_protocol` times out request headers and responses that the
client stops taking (uvicorn does neither), and `RedactApiKeys` keeps `?api_key=` values out
of uvicorn's access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qs, unquote_plus, urlsplit

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lowvox.errors import InvalidRequest
from lowvox.server.errors import error_response
from lowvox.server.routes.paths import collapse_slashes

if sys.platform == "linux":
    import fcntl
    import termios

logger = logging.getLogger(__name__)

# The page itself and its assets hold no data; the page asks for the key and sends it.
_OPEN_PATHS = ("/", "/favicon.ico")
_OPEN_PREFIXES = ("/static/",)

SESSION_PATH = "/api/session"
SESSION_TTL_S = 12 * 3600


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return dict(scope.get("headers") or [])


# -- Host and Origin ------------------------------------------------------------------------


def host_names(host: str, public_url: str | None, extra: Iterable[str]) -> frozenset[str] | None:
    """The names a Host header may carry besides IP addresses and `*.localhost`; None when
    `extra` holds "*" (no check)."""
    extra = [name.lower() for name in extra]
    if "*" in extra:
        return None
    # Containers reach the host by these names (Open WebUI in Docker): a page on the web
    # cannot be served under them, so DNS rebinding cannot use them either.
    names = {"localhost", "host.docker.internal", "host.containers.internal"}
    names.update({host.strip("[]").lower(), *extra})
    if public_url:
        names.add((urlsplit(public_url).hostname or "").lower())
    machine = socket.gethostname().lower()
    names.update({machine, f"{machine}.local"})
    names.discard("")
    return frozenset(names)


def _split_host(value: str) -> str:
    """The name in a Host header value (`name`, `name:port`, `[v6]:port`), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _without_default_port(netloc: str) -> str:
    # Behind a TLS proxy the page is https://name while the Host says name (or name:443).
    return re.sub(r":(80|443)$", "", netloc.strip().lower())


class SiteGuardMiddleware:
    """Refuses requests for a Host this server does not answer to (400) and browser
    requests from web pages whose origin is not allowed (403)."""

    def __init__(
        self,
        app: ASGIApp,
        hosts: frozenset[str] | None,
        origins: Iterable[str],
        public_url: str | None = None,
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(origins)
        self.public = None
        if public_url:
            parts = urlsplit(public_url)
            self.public = f"{parts.scheme}://{parts.netloc}".lower()

    def host_allowed(self, value: str) -> bool:
        if self.hosts is None:
            return True
        name = _split_host(value)
        return (
            name in self.hosts
            or _is_ip(name)
            or name.endswith(".localhost")
            or any(h.startswith(".") and name.endswith(h) for h in self.hosts)
        )

    def origin_allowed(self, origin: str, host: str) -> bool:
        if "*" in self.origins or origin in self.origins or origin == self.public:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False  # "null": sandboxed frames, file:// pages
        # The page this server sent: its origin names the server as the Host header does.
        return _without_default_port(parts.netloc) == _without_default_port(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if sum(name == b"host" for name, _ in scope.get("headers") or ()) > 1:
            # This check would read one and the routes another (RFC 9112: a 400).
            message = "a request has one Host header"
            await error_response(400, message, "invalid_request_error")(scope, receive, send)
            return
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self.host_allowed(host):
            message = (
                f"this server does not answer to the name {_split_host(host)!r}; if clients "
                "reach it by that name, add it to allowed_hosts (--allowed-host, "
                "LOWVOX_ALLOWED_HOSTS)"
            )
            await error_response(400, message, "invalid_request_error")(scope, receive, send)
            return
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower()
        if origin and not self.origin_allowed(origin, host):
            message = (
                f"requests from web pages at {origin} are refused; to let that page use "
                "lowvox, add it to cors_origins (--cors-origin, LOWVOX_CORS_ORIGINS)"
            )
            await error_response(403, message, "permission_error")(scope, receive, send)
            return
        await self.app(scope, receive, send)


# -- The API key, its session cookie and trusted networks -----------------------------------


def session_cookie_name(scope: Scope) -> str:
    # Cookies ignore ports: one name per port keeps two servers on one machine apart.
    server = scope.get("server")
    return f"lowvox_session_{server[1]}" if server and server[1] else "lowvox_session"


def session_token(key: str, now: float | None = None, ttl: float = SESSION_TTL_S) -> str:
    """`<expiry>.<signature>`: signed with the key, so changing the key ends every session
    and nothing needs to be stored."""
    expires = int((time.time() if now is None else now) + ttl)
    return f"{expires}.{_sign(key, expires)}"


def session_valid(key: str, token: str, now: float | None = None) -> bool:
    expires, _, signature = token.partition(".")
    if not (expires.isascii() and expires.isdigit()):
        return False
    if int(expires) < (time.time() if now is None else now):
        return False
    # As bytes: a cookie may hold anything, and compare_digest takes only ASCII strings.
    return hmac.compare_digest(signature.encode(), _sign(key, int(expires)).encode())


def _sign(key: str, expires: int) -> str:
    message = f"lowvox-session:{expires}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def header_key(scope: Scope) -> bytes | None:
    """The key a request sends in `Authorization: Bearer` or `X-API-Key`."""
    headers = _headers(scope)
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].strip()
    return None


class ApiKeyMiddleware:
    """Rejects requests without the configured key. CORS preflights pass (they carry no
    credentials by design). Besides the headers, a key is accepted from `?api_key=` (for
    scripts; access logs redact it), from the web page's session cookie (set by
    `POST /api/session`; only on requests the page itself makes), and is not needed from
    the peers in `trusted_networks`."""

    def __init__(self, app: ASGIApp, api_key: str, trusted_networks: Iterable[str] = ()) -> None:
        self.app = app
        self.key = api_key
        self.networks = [ipaddress.ip_network(n, strict=False) for n in trusted_networks]

    def _presented(self, scope: Scope) -> bytes | None:
        key = header_key(scope)
        if key is not None:
            return key
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "api_key" in query:
            return query["api_key"][0].encode()
        return None

    def _session(self, scope: Scope) -> bool:
        headers = _headers(scope)
        # SameSite=Strict still sends the cookie from pages on another port of the same
        # host; only the page's own requests (or a typed URL) may use it.
        site = headers.get(b"sec-fetch-site", b"same-origin")
        if site not in (b"same-origin", b"none"):
            return False
        cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
        token = cookies.get(session_cookie_name(scope))
        return token is not None and session_valid(self.key, token)

    def _trusted(self, scope: Scope) -> bool:
        if not self.networks:
            return False
        headers = _headers(scope)
        # A request that came through a proxy is the proxy's: its clients could be anyone.
        if b"x-forwarded-for" in headers or b"forwarded" in headers:
            return False
        client = scope.get("client")
        try:
            address = ipaddress.ip_address(client[0]) if client else None
        except ValueError:  # a Unix socket's peer, say
            return False
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if (
            path in _OPEN_PATHS
            or path.startswith(_OPEN_PREFIXES)
            or (path == SESSION_PATH and scope["method"] == "DELETE")  # only clears a cookie
            or self._trusted(scope)
        ):
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        if presented is None and self._session(scope):
            await self.app(scope, receive, send)
            return
        if presented is not None and hmac.compare_digest(presented, self.key.encode()):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if presented is None else "invalid API key"
        answer = error_response(
            401, message, "authentication_error", headers={"WWW-Authenticate": "Bearer"}
        )
        await answer(scope, receive, send)


# -- Request bodies: size and pace ----------------------------------------------------------


class BodyTooLarge(InvalidRequest):
    status_code = 413


class BodyTimeout(InvalidRequest):
    status_code = 408


# Once a body has had `body_timeout` seconds, it must have come at this many bytes a
# second on average (as Apache's mod_reqtimeout MinRate): a client that trickles it a byte
# at a time, never silent for long, cannot hold its connection for as long as it likes.
MIN_BODY_RATE = 500


class BodyLimitMiddleware:
    """Refuses request bodies over the route's limit (413), by Content-Length before the
    route runs and by counting while the body arrives, and bodies that stop arriving for
    `timeout` seconds or arrive slower than `MIN_BODY_RATE` after those (408). `routes`
    maps (method, path) to a larger limit (uploads); every other route gets `limit`, so no
    text route reads a large body."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        routes: Mapping[tuple[str, str], int] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.routes = {(m.upper(), p.rstrip("/")): n for (m, p), n in (routes or {}).items()}
        self.timeout = timeout

    def limit_for(self, method: str, path: str) -> int:
        # The path as the routes match it (`/api//library/voices` is the upload route).
        return self.routes.get((method.upper(), collapse_slashes(path).rstrip("/")), self.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope.get("path", ""))
        declared = _headers(scope).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            size = int(declared)
            problem = BodyTooLarge(
                f"the request body ({size} bytes) is over the limit of {limit} bytes for this route"
            )
            await _refuse(problem)(scope, receive, send)
            return
        guard = _BodyGuard(receive, send, limit, self.timeout)
        with contextlib.suppress(BodyTooLarge, BodyTimeout):  # answered just below
            await self.app(scope, guard.receive, guard.send)
        if guard.problem is not None:
            await guard.answer(scope)


class _BodyGuard:
    """One request's receive and send, counting and timing its body. Once the body breaks a
    rule, whatever the route answers is replaced with the refusal."""

    def __init__(self, receive: Receive, send: Send, limit: int, timeout: float | None) -> None:
        self._receive = receive
        self._send = send
        self.limit = limit
        self.timeout = timeout
        self.seen = 0
        self.began: float | None = None  # when the route first asked for the body
        self.complete = False
        self.started = False
        self.answered = False
        self.problem: BodyTooLarge | BodyTimeout | None = None

    async def receive(self) -> Message:
        if self.problem is not None:
            raise self.problem
        if self.complete or self.timeout is None:
            # After the body, receive only waits for the client to go away: no timeout.
            return await self._receive()
        now = asyncio.get_running_loop().time()
        if self.began is None:
            self.began = now
        deadline = self.began + self.timeout + self.seen / MIN_BODY_RATE
        wait = min(self.timeout, deadline - now)
        try:
            message = await asyncio.wait_for(self._receive(), max(wait, 0.0))
        except asyncio.TimeoutError:
            if wait < self.timeout:
                self.problem = BodyTimeout(
                    f"the request body arrives too slowly ({self.seen} bytes in "
                    f"{now + max(wait, 0.0) - self.began:.0f} s; after the first "
                    f"{self.timeout:g} s it must average {MIN_BODY_RATE} bytes/s)"
                )
            else:
                self.problem = BodyTimeout(
                    f"the request body stopped arriving (nothing for {self.timeout:g} s)"
                )
            raise self.problem from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.problem = BodyTooLarge(
                    f"the request body is over the limit of {self.limit} bytes for this route"
                )
                raise self.problem
            self.complete = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if self.problem is not None and not self.started:
            return  # the refusal goes out instead (see answer)
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def answer(self, scope: Scope) -> None:
        if self.started or self.answered or self.problem is None:
            return
        self.answered = True
        await _refuse(self.problem)(scope, self._receive, self._send)


def _refuse(problem: BodyTooLarge | BodyTimeout):
    # The rest of the body is never read: the connection cannot carry another request.
    return error_response(
        problem.status_code, str(problem), "invalid_request_error", headers={"Connection": "close"}
    )


# -- Connections (uvicorn): headers and answers on time, API keys out of the access log -------

# Request line and headers together; more is refused (431).
MAX_HEADER_BYTES = 64 * 1024


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes written to `transport` that its peer has not taken yet: those in asyncio's
    buffer and, on Linux, those in the kernel's send queue (not sent, or not acknowledged).
    A client that reads anything makes this smaller, even when it reads too little for
    asyncio to see (the kernel reports a socket writable only once much of its send
    buffer is free, and that buffer grows to megabytes on a fast link)."""
    size = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sys.platform == "linux" and sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)  # SIOCOUTQ
            size += struct.unpack("i", queued)[0]
    return size


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close `transport` at once with a reset: what the client never took is dropped, not
    left with the kernel to deliver to a client that does not read."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def guarded_protocol(
    base: type[asyncio.Protocol],
    header_timeout: float,
    max_header_bytes: int = MAX_HEADER_BYTES,
    *,
    send_timeout: float | None = None,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class `base`, closing a connection whose request headers take
    longer than `header_timeout` seconds (counted from the connection's opening, or from
    the first byte of a later request) or run over `max_header_bytes`. uvicorn's own
    keep-alive timeout only runs between requests, and stops at the first byte of the next:
    without this, a client that sends half a request holds its connection for ever.

    With `send_timeout`, a connection is also reset once its client has taken none of the
    answer waiting for it for that many seconds (a reader that hung, or a slow-loris one):
    otherwise it would hold its connection, the job behind its answer and the answer's
    buffered audio for ever. The clock runs while bytes wait for the client in asyncio's
    buffer: from `pause_writing` (asyncio's call when the buffer goes over its high-water
    mark; uvicorn's `send` then waits) to `resume_writing`, and from the end of an answer
    whose last bytes are still buffered (`close()` waits for them) until they are gone.
    It starts again whenever the client takes some bytes. The reset is a disconnect to
    uvicorn (`connection_lost`): the application's waiting `send` returns and its
    `receive` says `http.disconnect`, so the answer stops and its job is cancelled as for
    a client that left."""

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _seen_cycle: object = None  # the request whose headers were last complete
        _pending = 0  # bytes of headers received for a request not yet started
        _send_timer: asyncio.TimerHandle | None = None
        _unsent = 0  # bytes the client had not taken when `_send_timer` last started

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._stop_send_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            self._start_send_timer()

        def resume_writing(self) -> None:
            # The client took most of the buffer; the application writes again.
            self._stop_send_timer()
            super().resume_writing()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._send_timer is None and self.transport.get_write_buffer_size():
                self._start_send_timer()  # the answer's tail, still waiting for the client

        def _start_send_timer(self) -> None:
            if send_timeout is None:
                return
            self._stop_send_timer()
            self._unsent = unsent_bytes(self.transport)
            self._send_timer = asyncio.get_running_loop().call_later(
                send_timeout, self._send_expired
            )

        def _stop_send_timer(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _send_expired(self) -> None:
            self._send_timer = None
            paused = getattr(getattr(self, "flow", None), "write_paused", False)
            if not paused and not self.transport.get_write_buffer_size():
                return  # nothing waits for the client here any more (the kernel has the rest)
            unsent = unsent_bytes(self.transport)
            if unsent < self._unsent:  # the client took some: another period for the rest
                self._start_send_timer()
                return
            # A closing transport too: close() waits for the client to take its buffer.
            client = getattr(self, "client", None)
            peer = f"{client[0]}:{client[1]}" if client else "a client"
            logger.info(
                "closing the connection from %s: it took no data for %g s (send_timeout)",
                peer,
                send_timeout,
            )
            _reset(self.transport)

        def data_received(self, data: bytes) -> None:
            waiting = self._waiting()
            if waiting and self._header_timer is None:
                self._arm()
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is not self._seen_cycle:
                # A request's headers are complete; its body has a timeout of its own.
                self._seen_cycle = cycle
                self._pending = 0
                self._disarm()
            elif waiting:
                self._pending += len(data)
                if self._pending > max_header_bytes:
                    self._refuse(
                        431, "Request Header Fields Too Large", "request headers too large"
                    )

        def _waiting(self) -> bool:
            """Between requests: none started yet, or the last one answered."""
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = asyncio.get_running_loop().call_later(
                header_timeout, self._expired
            )

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self._waiting() or getattr(self, "cycle", None) is not self._seen_cycle:
                return
            if self._pending:
                self._refuse(408, "Request Timeout", "request headers took too long")
            elif not self.transport.is_closing():
                self.transport.close()  # opened, and nothing sent

        def _refuse(self, status: int, reason: str, text: str) -> None:
            if self.transport.is_closing():
                return
            body = text.encode()
            head = (
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


# A query parameter in a URL: its name and value, as they were sent. A name holds no `?`:
# otherwise the name from each `?` of `??????` would run to the end of the text, and a
# request line of 64 KB took seconds to log (on the event loop). A key after a `?` in
# another's name or value (`?x?api_key=`) is not one ApiKeyMiddleware takes; it is still
# hidden, from its own `?`.
_QUERY_PARAM = re.compile(r"([?&])([^=&?\s\"'#]*)=([^&\s\"']*)")


def redact_api_keys(text: str) -> str:
    """`text` with the value of every `api_key` query parameter replaced. The name is
    compared as `ApiKeyMiddleware` reads it, decoded (`api%5Fkey`, `ap%69_key`)."""

    def redact(m: re.Match[str]) -> str:
        if unquote_plus(m.group(2)).lower() != "api_key":
            return m.group(0)
        return f"{m.group(1)}{m.group(2)}=[redacted]"

    return _QUERY_PARAM.sub(redact, text)


class RedactApiKeys(logging.Filter):
    """Hides `api_key` values in log records (uvicorn's access log prints every URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_api_keys(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_api_keys(a) if isinstance(a, str) else a for a in record.args
            )
        return True
