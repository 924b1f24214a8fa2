"""Our client for the policy server (openpi's ``WebsocketClientPolicy`` works as well): the same ``infer(obs)``
interface, errors raised as ``ServerError`` with the server's message, and API-key authentication by header or by
first message. Imports only numpy, msgpack and websockets (what a robot computer has)."""

from __future__ import annotations

import http.client
from typing import Optional

import websockets.sync.client

from motus_fast.serve import wire


class ServerError(RuntimeError):
    """The server answered a request with an error (the message names the offending field)."""


class MotusClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, api_key: Optional[str] = None,
                 api_key_in_message: bool = False, open_timeout: float = 30.0,
                 max_reply_bytes: Optional[int] = 256 * 2**20):
        self.uri = host if host.startswith("ws") else f"ws://{host}:{port}"
        self._budget = wire.DecodeBudget(max_bytes=max_reply_bytes or 2**62, max_objects=2**20, max_depth=32)
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key and not api_key_in_message else None
        # entered as a context manager (what websockets >= 17 asks for); close() leaves it
        self._ws = websockets.sync.client.connect(self.uri, compression=None, max_size=max_reply_bytes,
                                                  additional_headers=headers, open_timeout=open_timeout).__enter__()
        try:
            if api_key and api_key_in_message:
                self._ws.send(wire.pack({"api_key": api_key}))
            self.metadata = self._receive()
        except BaseException:
            self._ws.close()
            raise

    def _receive(self) -> dict:
        reply = self._ws.recv()
        if isinstance(reply, str):
            raise ServerError(reply)
        return wire.unpack(reply, self._budget)

    def get_server_metadata(self) -> dict:
        return self.metadata

    def infer(self, obs: dict) -> dict:
        """One request (see motus_fast.serve.schema.FIELDS) -> {"actions": ..., "server_timing": {...}, ...}"""
        self._ws.send(wire.pack(obs))
        return self._receive()

    def reset(self) -> None:
        """Nothing to reset on the server (openpi's BasePolicy interface)."""

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "MotusClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def healthz(host: str = "127.0.0.1", port: int = 8000, timeout: float = 5.0) -> bool:
    """True if the server answers GET /healthz with 200."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
