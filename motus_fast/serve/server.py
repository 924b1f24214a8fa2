"""The websocket policy server, wire-compatible with an unmodified ``openpi_client.WebsocketClientPolicy``.

Protocol (openpi's): the client connects (optionally with the header ``Authorization: Api-Key <key>``), the
server sends its metadata (one msgpack map), then every binary message the client sends is one request (a msgpack
map of fields, see ``motus_fast.serve.schema``) answered by one binary msgpack response ``{"actions": ...,
"server_timing": {...}}``. An error is answered with a text frame ``"error: <what, naming the field>"`` (the
openpi client raises it as RuntimeError) and the connection stays usable. ``GET /healthz`` answers 200 "OK".

Safety (the server is written for hostile clients; ``ServeConfig`` holds every limit):
- binds 127.0.0.1 unless told otherwise; an optional API key, checked in constant time, as the header above or,
  for clients that cannot set headers, as the first message ``{"api_key": "<key>"}``. A wrong, duplicated or
  malformed header is refused at the handshake (401 / 400, one log line); a wrong first message gets an error
  frame and close code 1008. Until it has sent its key a connection may send at most ``auth_message_bytes``
  (checked per frame, before the payload is buffered), must do so within ``auth_timeout_s``, and counts against
  ``max_unauthenticated``, not ``max_connections``: connections without a key can never lock out key holders.
- memory per connection is bounded: messages above ``max_message_bytes`` close the connection (1009), reading
  from its socket pauses once more than ``receive_queue`` frames wait, its next message is read only after its
  current one is answered (at most (receive_queue + 2) x max_message_bytes held), a client that stops reading its
  replies is dropped after ``send_timeout_s``, and freed message buffers go back to the OS (``malloc_trim``).
- a message is checked against a total decode budget (bytes, objects, depth: ``wire.DecodeBudget``) before
  msgpack builds anything, decoded and validated off the event loop, and validated before it reaches the model.
- every error reply and log line quoting client text is escaped and at most ``MAX_ERROR_CHARS`` long.
- admission (``scheduler``): a per-request cost limit, a bounded queue answering "busy, retry after", round-robin
  across connections, micro-batching of compatible requests within ``batch_window_ms``.
- SIGTERM / SIGINT: stop accepting, let in-flight requests finish (up to ``shutdown_deadline_s``), close the
  connections with 1001, return (the CLI exits 0).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import http
import itertools
import logging
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from motus_fast.serve import wire
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.policy import MotusPolicy
from motus_fast.serve.scheduler import Scheduler, request_cost
from motus_fast.serve.schema import ValidationError, validate

log = logging.getLogger("motus_fast")
# websockets' own INFO lines (every response, every open) are replaced by ours: one line per refused handshake
_WS_LOG = logging.getLogger("motus_fast.websockets")
_WS_LOG.setLevel(logging.WARNING)

AUTH_HEADER_PREFIX = "Api-Key "
CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION, CLOSE_TRY_AGAIN_LATER = 1001, 1008, 1013
MAX_ERROR_CHARS = 4096          # an error reply or a log line quoting a client is at most this long


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """Client-influenced text made safe for a reply or a log line: control and non-ASCII characters escaped,
    cut to `limit` characters (with a note of the original length)."""
    text = str(text)
    safe = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in safe)
    if len(safe) <= limit and len(text) <= limit:
        return safe
    note = f"... ({len(text)} characters)"
    return safe[:limit - len(note)] + note


def error_reply(message: str) -> str:
    return clip(f"error: {message}")


class PolicyServer:
    def __init__(self, policy: MotusPolicy, config: ServeConfig):
        self.policy, self.config = policy, config
        self.port: Optional[int] = None              # the bound port, once listening
        self.budget = wire.DecodeBudget(max_bytes=config.max_message_bytes, max_objects=config.max_decoded_objects,
                                        max_depth=config.max_decoded_depth)
        self.auth_budget = wire.DecodeBudget(max_bytes=config.auth_message_bytes,
                                             max_objects=wire.AUTH_BUDGET.max_objects,
                                             max_depth=wire.AUTH_BUDGET.max_depth)
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="motus-decode")
        self.scheduler = Scheduler(self._run_batch, max_queued=config.max_queued_requests, max_batch=config.max_batch,
                                   window_s=config.batch_window_ms / 1e3, default_steps=policy.engine.steps)
        self._ids = itertools.count()
        self._authenticated = 0                      # open connections that may send requests
        self._unauthenticated = 0                    # open connections still owing their key message
        self._busy: dict[ServerConnection, bool] = {}    # open connections -> a request of theirs is in flight
        self._header_authenticated = weakref.WeakSet()   # connections whose handshake carried the right key
        self._draining = False
        self._metadata = wire.pack(policy.metadata())
        self.requests_ok = self.requests_failed = self.requests_refused_busy = self.dropped_slow_readers = 0
        self._trimmed_at, self._trim_pending = 0.0, False

    # ---- running -------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: Optional[Callable[[int], None]] = None) -> None:
        """Serve until `stop` is set, then shut down gracefully. `ready(port)` is called once the socket is bound."""
        cfg = self.config
        async with serve(self._handle, cfg.host, cfg.port, compression=None, max_size=cfg.max_message_bytes,
                         max_queue=(cfg.receive_queue, 0), process_request=self._process_request,
                         process_response=self._process_response, server_header="motus_fast",
                         logger=_WS_LOG) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving on ws://%s:%d (healthz: http://%s:%d/healthz)%s", cfg.host, self.port, cfg.host,
                     self.port, " with an API key" if cfg.api_key else "")
            if ready is not None:
                ready(self.port)
            await stop.wait()
            await self._drain(server)
        self.scheduler.stop()
        self._decoder.shutdown(wait=True)

    async def _drain(self, server) -> None:
        """Stop accepting; idle connections close now, busy ones after their reply; past the deadline, all."""
        self._draining = True
        in_flight = sum(self._busy.values())
        log.info("shutting down: %d request(s) in flight, waiting up to %g s", in_flight,
                 self.config.shutdown_deadline_s)
        server.close(close_connections=False)           # stops listening; the handlers below finish on their own
        for ws, busy in list(self._busy.items()):
            if not busy:
                asyncio.ensure_future(ws.close(CLOSE_GOING_AWAY, "server shutting down"))
        try:
            await asyncio.wait_for(server.wait_closed(), self.config.shutdown_deadline_s)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("shutdown deadline of %g s passed with %d request(s) in flight: closing every connection",
                        self.config.shutdown_deadline_s, sum(self._busy.values()))
            for ws in list(self._busy):
                ws.transport.abort()

    def serve_forever(self, ready: Optional[Callable[[int], None]] = None) -> None:
        """Blocking; SIGINT / SIGTERM shut it down gracefully and return."""
        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.run(stop, ready)
        asyncio.run(main())

    def start_in_thread(self, timeout: float = 60.0) -> "RunningServer":
        """Run the server on a background thread (benchmarks, in-process tests); returns once it listens."""
        started = threading.Event()
        holder: dict = {}

        def target():
            async def main():
                holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
                await self.run(holder["stop"], lambda port: started.set())
            try:
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001  (reported to the caller below)
                holder["error"] = e
                started.set()
        thread = threading.Thread(target=target, name="motus-serve", daemon=True)
        thread.start()
        if not started.wait(timeout) or "error" in holder:
            raise RuntimeError(f"the server did not start: {holder.get('error', 'timed out')}")
        return RunningServer(self, thread, holder["loop"], holder["stop"])

    # ---- handshake -----------------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        try:
            return self._admit(connection, request)
        except Exception as e:  # noqa: BLE001  (any oddity is the client's: a 400, logged below, no traceback)
            return connection.respond(http.HTTPStatus.BAD_REQUEST, f"bad request ({type(e).__name__})\n")

    def _process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """The one log line of every refused handshake (ours and websockets' own 400s)."""
        if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS and request.path != "/healthz":
            log.warning("refused a handshake from %s: %d %s", connection.remote_address, response.status_code,
                        clip(response.body.decode("utf-8", "replace").strip(), 300))

    def _admit(self, connection: ServerConnection, request: Request) -> Optional[Response]:
        def refuse(status, why: str) -> Response:
            return connection.respond(status, why + "\n")

        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if request.path != "/":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found: connect to / (websocket) or GET "
                                                                 "/healthz\n")
        if self._draining:
            return refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        headers = request.headers.get_all("Authorization")
        if len(headers) > 1:
            return refuse(http.HTTPStatus.BAD_REQUEST, "more than one Authorization header")
        if self.config.api_key is None or headers:
            if self._authenticated >= self.config.max_connections:
                return refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
        elif self._unauthenticated >= self.config.max_unauthenticated:
            return refuse(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections without a key; send the "
                          "header 'Authorization: Api-Key <key>'")
        if self.config.api_key is not None and headers:
            header = headers[0]
            key = header[len(AUTH_HEADER_PREFIX):] if header.startswith(AUTH_HEADER_PREFIX) else None
            if not self._key_matches(key):
                return refuse(http.HTTPStatus.UNAUTHORIZED, "invalid API key")
            self._header_authenticated.add(connection)
        elif self.config.api_key is not None:
            # until the key arrives, frames above the auth limit are refused from their header (websockets reads
            # this attribute for every frame, the first one included): a connection without a key cannot make
            # the server buffer megabytes
            connection.protocol.max_message_size = self.config.auth_message_bytes
        return None

    def _key_matches(self, key) -> bool:
        if not isinstance(key, str):
            return False
        return hmac.compare_digest(key.encode("utf-8", "replace"), self.config.api_key.encode("utf-8"))

    async def _authenticate_by_message(self, ws: ServerConnection) -> bool:
        try:
            first = await asyncio.wait_for(ws.recv(), timeout=self.config.auth_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("refused a connection from %s: no key within %g s", ws.remote_address,
                        self.config.auth_timeout_s)
            await ws.close(CLOSE_POLICY_VIOLATION, "authentication timed out")
            return False
        key = None
        if isinstance(first, bytes):
            try:
                msg = wire.unpack(first, self.auth_budget)
                key = msg.get("api_key") if isinstance(msg, dict) and set(msg) == {"api_key"} else None
            except wire.WireError:
                key = None
        if self._key_matches(key):
            ws.protocol.max_message_size = self.config.max_message_bytes
            return True
        log.warning("refused a connection from %s: no valid API key", ws.remote_address)
        if await self._send(ws, "error: authentication failed: send the header 'Authorization: Api-Key <key>' or "
                                "first the message {'api_key': <key>}"):
            await ws.close(CLOSE_POLICY_VIOLATION, "authentication failed")
        return False

    # ---- connections ---------------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        conn, peer = next(self._ids), ws.remote_address
        authenticated = self.config.api_key is None or ws in self._header_authenticated
        self._busy[ws] = False
        counted = "_authenticated" if authenticated else "_unauthenticated"
        setattr(self, counted, getattr(self, counted) + 1)
        try:
            # concurrent handshakes all passed the check in _admit: re-check now that this one is counted
            limit = self.config.max_connections if authenticated else self.config.max_unauthenticated
            if getattr(self, counted) > limit:
                log.warning("refused a connection from %s: too many connections", peer)
                await ws.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
                return
            if not authenticated:
                if not await self._authenticate_by_message(ws):
                    return
                if self._authenticated >= self.config.max_connections:
                    log.warning("refused a connection from %s: too many connections", peer)
                    await ws.close(CLOSE_TRY_AGAIN_LATER, "too many connections")
                    return
                self._unauthenticated -= 1
                self._authenticated += 1
                counted = "_authenticated"
            self.scheduler.set_open_connections(self._authenticated)
            log.info("connection from %s opened", peer)
            if not await self._send(ws, self._metadata):
                return
            while not self._draining:
                message = await ws.recv()
                self._busy[ws] = True
                serving = self._serve(conn, message)
                del message                 # _serve drops it once decoded: hold no second reference here
                reply = await serving
                if not await self._send(ws, reply):
                    return
                self._busy[ws] = False
            await ws.close(CLOSE_GOING_AWAY, "server shutting down")
        except websockets.ConnectionClosed:
            pass
        finally:
            setattr(self, counted, getattr(self, counted) - 1)
            self.scheduler.cancel(conn)
            self.scheduler.set_open_connections(self._authenticated)
            self._busy.pop(ws, None)
            self._header_authenticated.discard(ws)
            log.info("connection from %s closed", peer)
            self._release_memory()

    async def _send(self, ws: ServerConnection, reply) -> bool:
        """Send a reply; a client that does not take it within send_timeout_s is dropped. -> sent"""
        try:
            await asyncio.wait_for(ws.send(reply), self.config.send_timeout_s)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            self.dropped_slow_readers += 1
            log.warning("dropped %s: it did not read its reply within %g s", ws.remote_address,
                        self.config.send_timeout_s)
            ws.transport.abort()            # a half-sent frame cannot be completed: no closing handshake
            return False

    async def _serve(self, conn: int, message) -> bytes | str:
        """One message -> the reply (msgpack bytes, or an error text frame)."""
        received = time.perf_counter()
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(self._decoder, self._decode, message)
        del message                         # the request's arrays are views of it; nothing else may keep it alive
        if isinstance(request, str):
            return self._refuse("bad request", request)
        cost = request_cost(request, self.policy.engine.steps)
        if cost > self.config.max_request_cost:
            return self._refuse("too costly", f"request cost {cost} (batch x latent frames x steps, x 2 with "
                                f"return_frames) exceeds the server's max_request_cost {self.config.max_request_cost}")
        done = loop.create_future()

        def on_done(result):                # on the worker thread
            reply = self._reply(result, received)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(reply))
        try:
            retry_after = self.scheduler.submit(conn, request, on_done)
        except RuntimeError as e:
            return self._refuse("refused", str(e))
        if retry_after is not None:
            self.requests_refused_busy += 1
            return error_reply(f"busy: {self.config.max_queued_requests} requests are waiting; retry after "
                               f"{retry_after:g} s")
        return await done

    def _decode(self, message):
        """-> the validated Request, or the error text (runs on a decode thread). Errors are returned as text, not
        raised: a raised exception's traceback would keep the message (up to max_message_bytes) alive in a
        reference cycle until the garbage collector happens to run."""
        try:
            if isinstance(message, str):
                raise wire.WireError("expected a binary msgpack message, got a text frame")
            return validate(wire.unpack(message, self.budget), self.policy.spec)
        except (wire.WireError, ValidationError) as e:
            return str(e)
        except Exception as e:  # noqa: BLE001  (a decoder bug must not take the connection down)
            log.error("internal error while decoding a request: %s", clip(repr(e), 1000))
            return f"internal error ({type(e).__name__})"

    def _refuse(self, what: str, why: str) -> str:
        self.requests_failed += 1
        reply = error_reply(why)
        log.info("%s: %s", what, reply[len("error: "):])
        return reply

    def _run_batch(self, requests):
        """The scheduler's batch runner (worker thread)."""
        return self.policy.infer_batch(requests)

    def _reply(self, result, received: float):
        """A policy result -> msgpack bytes or an error text frame (worker thread)."""
        if isinstance(result, ValidationError):
            return self._refuse("bad request", str(result))
        if isinstance(result, Exception):
            self.requests_failed += 1
            log.error("internal error while serving a request: %s", clip(repr(result), 1000),
                      exc_info=(type(result), result, result.__traceback__))
            return error_reply(f"internal error ({type(result).__name__}: {result})")
        timing = result["server_timing"]
        timing["queue_ms"] = max(0.0, (time.perf_counter() - received) * 1e3 - timing["infer_ms"])
        self.requests_ok += 1
        return wire.pack(result)

    def _release_memory(self) -> None:
        """Give freed message buffers back to the OS (glibc keeps large freed blocks in its heaps otherwise: four
        flooding clients left ~0.25 GB held). Off the event loop, at most once a second: a close within a second
        of the last trim schedules one trim for the end of that second."""
        if _malloc_trim is None or self._trim_pending:
            return
        self._trim_pending = True
        delay = max(0.0, self._trimmed_at + 1.0 - time.monotonic())
        asyncio.get_running_loop().call_later(delay, self._trim)

    def _trim(self) -> None:
        self._trim_pending, self._trimmed_at = False, time.monotonic()
        self._decoder.submit(_malloc_trim, 0)


def _find_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()
if _malloc_trim is None:
    log.info("malloc_trim is not available (not glibc): freed message buffers stay with the allocator")


class RunningServer:
    """A server running on a background thread (from ``PolicyServer.start_in_thread``)."""

    def __init__(self, server: PolicyServer, thread: threading.Thread, loop, stop: asyncio.Event):
        self.server, self.thread, self._loop, self._stop = server, thread, loop, stop

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 30.0) -> None:
        """What SIGTERM does: stop accepting, finish in-flight requests, close."""
        if not self.thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
