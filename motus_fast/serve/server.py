"""The websocket policy server, wire-compatible with an unmodified ``openpi_client.WebsocketClientPolicy``.

Protocol (openpi's): the client connects (optionally with the header ``Authorization: Api-Key <key>``), the
server sends its metadata (one msgpack map), then every binary message the client sends is one request (a msgpack
map of fields, see ``motus_fast.serve.schema``) answered by one binary msgpack response ``{"actions": ...,
"server_timing": {...}}``. An error is answered with a text frame ``"error: <what, naming the field>"`` (the
openpi client raises it as RuntimeError) and the connection stays usable. ``GET /healthz`` answers 200 "OK".

Safety: binds 127.0.0.1 unless told otherwise; an optional API key, checked in constant time, as the header
above or, for clients that cannot set headers, as the first message ``{"api_key": "<key>"}`` (a wrong header is
refused at the handshake with 401; a wrong or missing first message gets an error frame and close code 1008);
messages above ``max_message_bytes`` close the connection (1009); at most ``max_connections`` at once (503 beyond).
Requests are decoded without pickle (``motus_fast.serve.wire``) and validated before they reach the model.

Concurrency: connections are served by one asyncio loop; decoding, validation and inference run on a single worker
thread (one model, one device), so requests from all clients queue in arrival order.
"""

from __future__ import annotations

import asyncio
import hmac
import http
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
from motus_fast.serve.schema import ValidationError, validate

log = logging.getLogger("motus_fast")

AUTH_HEADER_PREFIX = "Api-Key "
CLOSE_POLICY_VIOLATION = 1008


class PolicyServer:
    def __init__(self, policy: MotusPolicy, config: ServeConfig):
        self.policy, self.config = policy, config
        self.port: Optional[int] = None              # the bound port, once listening
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="motus-infer")
        self._active = 0
        self._header_authenticated = weakref.WeakSet()   # connections whose handshake carried the right key
        self._metadata = wire.pack(policy.metadata())
        self.requests_ok = self.requests_failed = 0

    # ---- running -------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready: Optional[Callable[[int], None]] = None) -> None:
        """Serve until `stop` is set. `ready(port)` is called once the socket is bound."""
        cfg = self.config
        async with serve(self._handle, cfg.host, cfg.port, compression=None, max_size=cfg.max_message_bytes,
                         process_request=self._process_request, server_header="motus_fast") as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving on ws://%s:%d (healthz: http://%s:%d/healthz)%s", cfg.host, self.port, cfg.host,
                     self.port, " with an API key" if cfg.api_key else "")
            if ready is not None:
                ready(self.port)
            await stop.wait()
        self._worker.shutdown(wait=True)

    def serve_forever(self, ready: Optional[Callable[[int], None]] = None) -> None:
        """Blocking; SIGINT / SIGTERM stop it cleanly."""
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
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if request.path != "/":
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found: connect to / (websocket) or GET "
                                                                 "/healthz\n")
        if self._active >= self.config.max_connections:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        header = request.headers.get("Authorization")
        if self.config.api_key is not None and header is not None:
            if not self._key_matches(header[len(AUTH_HEADER_PREFIX):] if header.startswith(AUTH_HEADER_PREFIX)
                                     else None):
                log.warning("refused a connection from %s: wrong API key header", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "invalid API key\n")
            self._header_authenticated.add(connection)
        return None

    def _key_matches(self, key) -> bool:
        if not isinstance(key, str):
            return False
        return hmac.compare_digest(key.encode("utf-8", "replace"), self.config.api_key.encode("utf-8"))

    async def _authenticate_by_message(self, ws: ServerConnection) -> bool:
        try:
            first = await asyncio.wait_for(ws.recv(), timeout=self.config.auth_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            await ws.close(CLOSE_POLICY_VIOLATION, "authentication timed out")
            return False
        key = None
        if isinstance(first, bytes):
            try:
                msg = wire.unpack(first, max_container_len=16)
                key = msg.get("api_key") if isinstance(msg, dict) and set(msg) == {"api_key"} else None
            except wire.WireError:
                key = None
        if self._key_matches(key):
            return True
        log.warning("refused a connection from %s: no valid API key", ws.remote_address)
        await ws.send("error: authentication failed: send the header 'Authorization: Api-Key <key>' or first the "
                      "message {'api_key': <key>}")
        await ws.close(CLOSE_POLICY_VIOLATION, "authentication failed")
        return False

    # ---- connections ---------------------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self._active += 1
        peer = ws.remote_address
        try:
            if self.config.api_key is not None and ws not in self._header_authenticated:
                if not await self._authenticate_by_message(ws):
                    return
            log.info("connection from %s opened", peer)
            await ws.send(self._metadata)
            loop = asyncio.get_running_loop()
            async for message in ws:
                received = time.perf_counter()
                reply = await loop.run_in_executor(self._worker, self._answer, message, received)
                await ws.send(reply)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._active -= 1
            self._header_authenticated.discard(ws)
            log.info("connection from %s closed", peer)

    def _answer(self, message, received: float):
        """One request -> msgpack bytes, or an error text frame. Runs on the worker thread."""
        queue_ms = (time.perf_counter() - received) * 1e3
        try:
            if isinstance(message, str):
                raise wire.WireError("expected a binary msgpack message, got a text frame")
            request = validate(wire.unpack(message), self.policy.spec)
            response = self.policy.infer(request)
            response["server_timing"]["queue_ms"] = queue_ms
            reply = wire.pack(response)
        except (wire.WireError, ValidationError) as e:
            self.requests_failed += 1
            log.info("bad request: %s", e)
            return f"error: {e}"
        except Exception as e:  # noqa: BLE001  (the server must outlive any one request)
            self.requests_failed += 1
            log.exception("internal error while serving a request")
            return f"error: internal error ({type(e).__name__}: {e})"
        self.requests_ok += 1
        return reply


class RunningServer:
    """A server running on a background thread (from ``PolicyServer.start_in_thread``)."""

    def __init__(self, server: PolicyServer, thread: threading.Thread, loop, stop: asyncio.Event):
        self.server, self.thread, self._loop, self._stop = server, thread, loop, stop

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, timeout: float = 30.0) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
