"""The server under hostile clients and fleet load, in process on 127.0.0.1 (tiny 1-layer model, 1 Euler step):
decode bombs, floods, lock-out, handshake oddities, echoed input, slow readers, costly requests, a full queue,
round-robin, micro-batching (bitwise equal to requests alone) and graceful shutdown. Each test takes seconds."""

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import msgpack
import numpy as np
import pytest
import torch
import websockets.sync.client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from motus_fast.config import get_preset
from motus_fast.encoders import StubEncoders
from motus_fast.infer import InferenceEngine
from motus_fast.infer.cache import LRUCache
from motus_fast.model import Motus
from motus_fast.serve import wire
from motus_fast.serve.client import MotusClient, ServerError, healthz
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.policy import MotusPolicy
from motus_fast.serve.scheduler import Scheduler
from motus_fast.serve.schema import validate
from motus_fast.serve.server import MAX_ERROR_CHARS, PolicyServer, clip

IMAGE = (32, 32)
KEY = "k" * 16
HEADER = {"Authorization": f"Api-Key {KEY}"}


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = Motus(get_preset("tiny").override({"num_layers": 1}))
    return InferenceEngine(model, StubEncoders(model.cfg, IMAGE), steps=1)


@contextlib.contextmanager
def running(engine, hold=None, **overrides):
    """A server on a free port; `hold`: an Event the model waits for before each batch (to keep it busy)."""
    config = ServeConfig(**dict(dict(port=0), **overrides))
    policy = MotusPolicy(engine, config)
    if hold is not None:
        infer_batch = policy.infer_batch
        policy.infer_batch = lambda reqs: (hold.wait(30), infer_batch(reqs))[1]
    srv = PolicyServer(policy, config).start_in_thread()
    try:
        yield srv
    finally:
        if hold is not None:
            hold.set()
        srv.stop()


def observation(rng, **extra):
    return dict({"image": rng.integers(0, 256, IMAGE + (3,), dtype=np.uint8),
                 "state": rng.standard_normal(14).astype(np.float32), "prompt": "pick"}, **extra)


def connect(port, headers=HEADER, **kw):
    ws = websockets.sync.client.connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=None,
                                        compression=None, **kw).__enter__()
    return ws


def raw_http(port, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return s.recv(4096)


def decode_bomb(size: int = 12 * 10**6) -> bytes:
    """An array of 4096 arrays of empty maps: no container above 4096 entries, ~`size` objects in all."""
    per = min(4096, size // 4096 - 3)
    inner = b"\xdc" + per.to_bytes(2, "big") + b"\x80" * per
    return b"\xdc" + (4096).to_bytes(2, "big") + inner * 4096


# ---- 1. decoding with a budget -------------------------------------------------------------------------------
def test_scan_refuses_bombs_before_decoding():
    budget = wire.DecodeBudget()
    bomb = decode_bomb(2 * 10**6)
    with pytest.raises(wire.WireError, match="max_objects"):
        wire.unpack(bomb, budget)
    with pytest.raises(wire.WireError, match="max_depth"):
        wire.unpack(msgpack.packb([[[[[[[[[[1]]]]]]]]]]), budget)
    with pytest.raises(wire.WireError, match="decode budget of 100 bytes"):
        wire.unpack(msgpack.packb({"x": b"\x00" * 200}), wire.DecodeBudget(max_bytes=100))
    with pytest.raises(wire.WireError, match="max_objects"):
        wire.unpack(msgpack.packb({"api_key": "x", "b": 1, "c": 2, "d": 3, "e": 4}), wire.AUTH_BUDGET)
    # the scan's object count equals what msgpack builds (independent count over the decoded tree)
    msg = {"image": np.zeros((2, 3), np.uint8), "prompt": ["a", "b"], "n": None, "f": 1.5, "m": {"k": [1, -2]}}
    data = wire.pack(msg)

    def count(x):
        return 1 + (sum(count(k) + count(v) for k, v in x.items()) if isinstance(x, dict) else
                    sum(count(v) for v in x) if isinstance(x, list) else 0)
    assert wire.scan(data, budget) == count(msgpack.unpackb(data))


def test_decode_bomb_is_refused_without_stalling(engine):
    bomb = decode_bomb()
    with running(engine, api_key=KEY) as srv:
        ws = connect(srv.port)
        wire.unpack(ws.recv(timeout=10))
        stalls = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                t = time.perf_counter()
                assert healthz("127.0.0.1", srv.port, timeout=10)
                stalls.append(time.perf_counter() - t)
        prober = threading.Thread(target=probe)
        prober.start()
        ws.send(bomb)
        reply = ws.recv(timeout=30)
        stop.set()
        prober.join()
        assert isinstance(reply, str) and "max_objects" in reply and len(reply) <= MAX_ERROR_CHARS
        print(f"decode bomb: worst health-check latency {max(stalls) * 1e3:.1f} ms over {len(stalls)} probes")
        ws.close()
        # the same bomb as the first message of a connection without a key: refused from the frame header (1009)
        anon = connect(srv.port, headers=None)
        with pytest.raises((ConnectionClosed, OSError)):
            anon.send(bomb)
            anon.recv(timeout=10)
        assert anon.protocol.close_rcvd is None or anon.protocol.close_rcvd.code == 1009
        assert healthz("127.0.0.1", srv.port)


# ---- 2. per-connection memory ----------------------------------------------------------------------------------
def test_flooding_clients_get_a_bounded_receive_queue(engine):
    hold = threading.Event()
    junk = b"\xc1" * 2**20                          # 1 MiB frames, malformed: cheap to refuse once read
    with running(engine, hold=hold, api_key=KEY, max_message_bytes=2 * 2**20) as srv:
        floods = []
        for _ in range(4):
            ws = connect(srv.port)
            wire.unpack(ws.recv(timeout=10))
            ws.send(wire.pack(observation(np.random.default_rng(0))))     # occupies the connection (held)
            floods.append(ws)

        def flood(ws):
            with contextlib.suppress(Exception):
                for _ in range(12):                 # today's websockets default would queue all 12
                    ws.send(junk)
        threads = [threading.Thread(target=flood, args=(ws,), daemon=True) for ws in floods]
        for t in threads:
            t.start()
        time.sleep(1.5)
        queued = [len(ws.recv_messages.frames) for ws in list(srv.server._busy)]
        hold.set()
        for ws in floods:
            ws.close()
    assert len(queued) == 4 and max(queued) <= srv.server.config.receive_queue + 2, queued


def test_unauthenticated_connections_cannot_lock_out_key_holders(engine):
    with running(engine, api_key=KEY, max_connections=2, max_unauthenticated=2, auth_timeout_s=0.5) as srv:
        idle, refused = [], 0
        for _ in range(4):
            try:
                idle.append(connect(srv.port, headers=None))
            except InvalidStatus as e:
                assert e.response.status_code == 503
                refused += 1
        assert refused == 2
        with MotusClient("127.0.0.1", srv.port, api_key=KEY) as client:   # a key holder gets in at once
            assert client.infer(observation(np.random.default_rng(0)))["actions"].shape == (16, 14)
        for ws in idle:                                 # and the idle ones are dropped after the auth deadline
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.protocol.close_rcvd.code == 1008


def test_slow_reader_is_dropped(engine):
    with running(engine, send_timeout_s=0.5) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        ws = websockets.sync.client.connect(f"ws://127.0.0.1:{srv.port}", sock=sock, max_size=None).__enter__()
        rng = np.random.default_rng(0)
        big = wire.pack({"image": rng.integers(0, 256, (8,) + IMAGE + (3,), dtype=np.uint8),
                         "state": np.zeros((8, 14), np.float32), "prompt": ["a"] * 8, "mode": "world_model",
                         "actions": np.zeros((8, 16, 14), np.float32), "return_frames": True})

        def send_without_reading():
            with contextlib.suppress(Exception):
                for _ in range(400):
                    ws.send(big)
        threading.Thread(target=send_without_reading, daemon=True).start()
        deadline = time.monotonic() + 30
        while srv.server.dropped_slow_readers == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.server.dropped_slow_readers == 1
        assert healthz("127.0.0.1", srv.port)
        sock.close()


# ---- 3. handshake oddities and bounded text ----------------------------------------------------------------------
def test_handshake_oddities_get_4xx_and_one_line(engine, caplog):
    upgrade = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
    cases = {
        "duplicate Authorization": upgrade + b"Authorization: Api-Key " + KEY.encode() + b"\r\n"
                                   b"Authorization: Api-Key " + KEY.encode() + b"\r\n\r\n",
        "malformed Authorization": upgrade + b"Authorization: Bearer \xff\xfe\r\n\r\n",
        "no Sec-WebSocket-Key": b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                b"Sec-WebSocket-Version: 13\r\n\r\n",
        "duplicate Sec-WebSocket-Key": upgrade + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "bad version": upgrade.replace(b"Version: 13", b"Version: 99") + b"\r\n",
        "not an upgrade": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    caplog.set_level(logging.INFO)
    with running(engine, api_key=KEY) as srv:
        for name, request in cases.items():
            caplog.clear()
            status = int(raw_http(srv.port, request).split(b" ")[1])
            time.sleep(0.1)
            assert 400 <= status < 500, (name, status)
            assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], name
            refusals = [r.getMessage() for r in caplog.records if "refused a handshake" in r.getMessage()]
            assert len(refusals) == 1 and len(refusals[0]) <= MAX_ERROR_CHARS, (name, refusals)
        assert healthz("127.0.0.1", srv.port)


def test_error_replies_and_log_lines_are_bounded(engine, caplog):
    caplog.set_level(logging.INFO)
    rng = np.random.default_rng(0)
    good = observation(rng)
    with running(engine) as srv:
        ws = connect(srv.port, headers=None)
        wire.unpack(ws.recv(timeout=10))
        hostile = [dict(good, **{"\x1b[31m" + "f" * 2_000_000: 1}),        # a 2 MB field name with a control code
                   dict(good, prompt="p\n" * 600_000),
                   {"image": {b"__ndarray__": True, b"data": b"", b"dtype": "|u1", b"shape": [1] * 3000}}]
        for msg in hostile:
            ws.send(wire.pack(msg))
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and reply.startswith("error: ") and len(reply) <= MAX_ERROR_CHARS
            assert "\x1b" not in reply and "\n" not in reply
        ws.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines and max(len(line) for line in lines) <= MAX_ERROR_CHARS + 200
    assert not any("\x1b" in line for line in lines)
    assert clip("a\x00b" * 5000, 100).endswith("(15000 characters)") and len(clip("x" * 10**6, 100)) == 100


# ---- 4. caches bounded by bytes ------------------------------------------------------------------------------------
def test_cache_evicts_before_computing_and_holds_its_budget():
    cache = LRUCache(capacity=100, max_bytes=1000)
    for i in range(20):
        def compute():
            assert cache.bytes + cache.largest <= 1000      # room was made before this entry's tensors exist
            return {"kv": [torch.zeros(100 // 4 * (1 + i % 3))]}
        cache.get_or_compute(i, compute)
        assert cache.bytes <= 1000 and cache.bytes == sum(100 * (1 + j % 3) for j in range(20) if j in cache)
    value, hit = cache.get_or_compute("huge", lambda: torch.zeros(1000))     # larger than the budget: not kept
    assert not hit and "huge" not in cache and cache.bytes <= 1000
    counted = LRUCache(capacity=2)                                              # no byte budget: the count holds
    for i in range(5):
        counted.get_or_compute(i, lambda: torch.zeros(10))
    assert len(counted) == 2 and 4 in counted and 3 in counted


def test_policy_caches_take_the_budget_and_publish_it(engine):
    config = ServeConfig(instruction_cache_bytes=300_000, observation_cache_bytes=200_000)
    policy = MotusPolicy(engine, config)
    assert policy.metadata()["cache_budget_bytes"] == {"instructions": 300_000, "observations": 200_000}
    rng = np.random.default_rng(0)
    for i in range(12):
        policy.infer(validate(observation(rng, prompt=f"prompt {i}"), policy.spec))
        assert engine.instructions.bytes <= 300_000 and engine.observations.bytes <= 200_000
    assert 0 < len(engine.instructions) < 12 and engine.instructions.bytes > 0


# ---- 5. admission and fairness ---------------------------------------------------------------------------------------
def test_costly_request_is_refused_naming_the_limit(engine):
    with running(engine, max_request_cost=64) as srv, MotusClient("127.0.0.1", srv.port) as client:
        with pytest.raises(ServerError, match="max_request_cost 64"):
            client.infer(observation(np.random.default_rng(0), mode="joint", num_frames=16, steps=50))
        assert client.infer(observation(np.random.default_rng(0)))["actions"].shape == (16, 14)


def test_full_queue_answers_busy_retry_after(engine):
    hold = threading.Event()
    rng = np.random.default_rng(0)
    with running(engine, hold=hold, max_queued_requests=1, batch_window_ms=0) as srv:
        clients = [connect(srv.port, headers=None) for _ in range(3)]
        for ws in clients:
            wire.unpack(ws.recv(timeout=10))
        clients[0].send(wire.pack(observation(rng)))        # taken by the (held) worker
        time.sleep(0.3)
        clients[1].send(wire.pack(observation(rng)))        # waits in the queue
        time.sleep(0.3)
        clients[2].send(wire.pack(observation(rng)))        # finds the queue full
        reply = clients[2].recv(timeout=10)
        assert isinstance(reply, str) and reply.startswith("error: busy") and "retry after" in reply
        hold.set()
        for ws in clients[:2]:
            assert wire.unpack(ws.recv(timeout=30))["actions"].shape == (16, 14)
        for ws in clients:
            ws.close()


def fake_request(name):
    return types.SimpleNamespace(name=name, mode="vla", num_frames=1, steps=1, return_frames=False, state=None,
                                 prev_actions=None, future_frames=None, batch=1)


def test_round_robin_across_connections():
    order, gate = [], threading.Event()

    def run_batch(requests):
        gate.wait(10)
        order.extend(r.name for r in requests)
        return [None] * len(requests)
    sched = Scheduler(run_batch, max_queued=10, max_batch=1, window_s=0, default_steps=1)
    done = threading.Semaphore(0)
    sched.submit(0, fake_request("c0-a"), lambda r: done.release())       # running (held at the gate)
    time.sleep(0.2)
    for conn, name in ((0, "c0-b"), (0, "c0-c"), (1, "c1-a"), (2, "c2-a")):   # conn 0 queued first, twice
        assert sched.submit(conn, fake_request(name), lambda r: done.release()) is None
    gate.set()
    for _ in range(5):
        assert done.acquire(timeout=10)
    sched.stop(10)
    assert order == ["c0-a", "c1-a", "c2-a", "c0-b", "c0-c"]


# ---- 6. micro-batching -----------------------------------------------------------------------------------------------
def test_batched_requests_are_bitwise_what_they_get_alone(engine):
    policy = MotusPolicy(engine, ServeConfig())
    rng = np.random.default_rng(0)
    raw = [observation(rng, noise_seed=1),
           observation(rng, noise_seed=2, prompt="place"),
           dict(observation(rng, noise_seed=3), image=rng.integers(0, 256, (2,) + IMAGE + (3,), dtype=np.uint8),
                state=rng.standard_normal((2, 14)).astype(np.float32), prompt=["a", "b"]),
           observation(rng, noise_seed=4, prev_actions=rng.standard_normal((5, 14)).astype(np.float32),
                       inference_delay=2),
           observation(rng, noise_seed=5, mode="world_model", actions=rng.standard_normal((16, 14))),
           observation(rng, noise_seed=6, mode="world_model", actions=rng.standard_normal((16, 14)))]
    requests = [validate(r, policy.spec) for r in raw]
    together = policy.infer_batch(requests)
    assert [r["server_timing"]["batch_requests"] for r in together] == [3, 3, 3, 1, 2, 2]
    for req, got in zip(requests, together):
        alone = policy.infer(req)
        assert alone["server_timing"]["batch_requests"] == 1
        for field in ("actions", "video_latents"):
            if field in alone:
                assert got[field].dtype == alone[field].dtype and np.array_equal(got[field], alone[field]), field


def test_concurrent_clients_share_batches_and_get_their_own_results(engine):
    rng = np.random.default_rng(1)
    obs = [observation(rng, noise_seed=i, prompt=f"p{i % 2}") for i in range(4)]
    hold = threading.Event()
    with running(engine, hold=hold, batch_window_ms=200) as srv:
        clients = [MotusClient("127.0.0.1", srv.port) for _ in obs]
        results = [None] * len(obs)

        def ask(i):
            results[i] = clients[i].infer(obs[i])
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(obs))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        hold.set()
        for t in threads:
            t.join(30)
        policy = srv.server.policy
        assert max(r["server_timing"]["batch_requests"] for r in results) > 1
        for o, r in zip(obs, results):
            assert np.array_equal(r["actions"], policy.infer(validate(o, policy.spec))["actions"])
        for c in clients:
            c.close()


# ---- 7. graceful shutdown ---------------------------------------------------------------------------------------------
def test_stop_finishes_in_flight_requests(engine):
    hold = threading.Event()
    rng = np.random.default_rng(0)
    with running(engine, hold=hold) as srv:
        ws = connect(srv.port, headers=None)
        wire.unpack(ws.recv(timeout=10))
        ws.send(wire.pack(observation(rng)))
        time.sleep(0.3)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.3)
        with pytest.raises((InvalidStatus, OSError)):                # no longer accepting
            connect(srv.port, headers=None, open_timeout=5)
        hold.set()
        assert wire.unpack(ws.recv(timeout=30))["actions"].shape == (16, 14)     # the in-flight one finished
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.protocol.close_rcvd.code == 1001
        stopper.join(30)
        assert not srv.thread.is_alive()


def test_sigterm_exits_zero(tmp_path):
    env = dict(os.environ, MOTUS_BACKEND="reference", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "motus_fast.cli", "serve", "--preset", "tiny", "--set",
                             "num_layers=1", "--port", "0", "--threads", "1", "--steps", "1", "--encoders", "stub",
                             "--image-size", "32", "32"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = ""
        while "listening on" not in line:
            line = lines.get(timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
