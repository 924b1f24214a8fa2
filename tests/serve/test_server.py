"""Loopback tests of `motus-fast serve` in a subprocess (tiny model, 2 Euler steps, stub encoders):

- an unmodified openpi-client ``WebsocketClientPolicy`` gets the metadata and correct action chunks (equal to the
  plain sampler on the same checkpoint, encoders, normalization and noise seed), our client too (batched, other
  modes, API key by message), and real-time chunking joins chunks end to end;
- 200 malformed or hostile messages each get an error reply or a clean close, and the server keeps serving;
- 8 concurrent clients x 50 requests: no failed request; p50/p99 reported.
"""

import os
import queue
import secrets
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import websockets.sync.client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from motus_fast.data.norm import DatasetStats, FeatureStats, normalize, stats_to_json, unnormalize
from motus_fast.flow import sample
from motus_fast.encoders import StubEncoders
from motus_fast.model import Conditioning
from motus_fast.serve import wire
from motus_fast.serve.broker import ActionChunkBroker
from motus_fast.serve.client import MotusClient, ServerError, healthz
from motus_fast.weights import load_pretrained, save_pretrained

# openpi-client 0.1.2 calls websockets' connect() the pre-17.1 way; that warning is theirs
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")

IMAGE = (64, 64)
STEPS = 2
MAX_MESSAGE = 2**20


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """`motus-fast serve` on a free port, with an API key, serving the fixture's tiny model with norm stats."""
    rng = np.random.default_rng(0)
    cfg = tiny_model.cfg
    stats = DatasetStats(state=FeatureStats.compute(rng.standard_normal((64, cfg.action.state_dim)) * 2 + 1),
                         action=FeatureStats.compute(rng.standard_normal((64, cfg.action.action_dim)) * 3 - 1))
    ckpt = tmp_path_factory.mktemp("serve") / "ckpt"
    save_pretrained(tiny_model, ckpt, extra={"norm_stats": stats_to_json({"synthetic": stats}),
                                             "norm_mode": "mean_std"})
    key = secrets.token_hex(16)
    env = dict(os.environ, MOTUS_BACKEND="reference", OMP_NUM_THREADS="1", MOTUS_TEST_API_KEY=key)
    stderr = open(ckpt.parent / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "motus_fast.cli", "serve", "--checkpoint", str(ckpt), "--port", "0", "--threads", "1",
         "--steps", str(STEPS), "--api-key-env", "MOTUS_TEST_API_KEY", "--max-message-mb", str(MAX_MESSAGE / 2**20),
         "--image-size", *map(str, IMAGE), "--execute-steps", "8"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "listening on ws://" in line:
                url = line.split("listening on ws://")[1].split()[0]
        if url is None:
            stderr.seek(0)
            pytest.fail(f"the server did not start:\n{stderr.read()[-4000:]}")
        host, port = url.rsplit(":", 1)
        yield dict(host=host, port=int(port), key=key, ckpt=ckpt, stats=stats, proc=proc, log=stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()


def observation(rng, prompt="put the cube in the bowl", **extra):
    return dict({"image": rng.integers(0, 256, IMAGE + (3,), dtype=np.uint8),
                 "state": (rng.standard_normal(14) * 2 + 1).astype(np.float32), "prompt": prompt}, **extra)


def expected_vla_actions(server, obs, seed):
    """The plain sampler on the same checkpoint, stub encoders, normalization and noise: what the server must
    answer (raw units)."""
    model = load_pretrained(server["ckpt"]).eval()
    cfg, st = model.cfg, server["stats"]
    enc = StubEncoders(cfg, IMAGE)
    image = torch.from_numpy(obs["image"])[None]
    text, _ = enc.encode_prompts([obs["prompt"]])
    vlm, _ = enc.vlm_features(image, [obs["prompt"]])
    state = torch.from_numpy(np.asarray(normalize(obs["state"].astype(np.float64), st.state, "mean_std"),
                                        np.float32))[None]
    g = torch.Generator().manual_seed(seed)
    noise_video = torch.randn(1, cfg.video.in_channels, 2, IMAGE[0] // 16, IMAGE[1] // 16, generator=g)
    noise_action = torch.randn(1, cfg.action.chunk_size, cfg.action.action_dim, generator=g)
    out = sample(model, "vla", cond=Conditioning(text=text, vlm=vlm, state=state),
                 cond_latent=enc.encode_frames(image[:, None]), noise_video=noise_video, noise_action=noise_action,
                 steps=STEPS)
    return unnormalize(out.actions[0].double().numpy(), st.action, "mean_std")


def test_openpi_client_gets_correct_chunks(server, openpi_client):
    assert server["host"] == "127.0.0.1"                 # localhost unless --host says otherwise
    assert healthz(server["host"], server["port"])
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    policy = WebsocketClientPolicy(host=server["host"], port=server["port"], api_key=server["key"])
    meta = policy.get_server_metadata()
    assert (meta["action_horizon"], meta["action_dim"], meta["execute_steps"], meta["image_shape"],
            meta["normalization"]) == (16, 14, 8, [64, 64, 3], "mean_std")
    rng = np.random.default_rng(1)
    for seed in (5, 6):
        obs = observation(rng, noise_seed=seed)
        reply = policy.infer(obs)
        assert reply["actions"].shape == (16, 14) and reply["actions"].dtype == np.float32
        np.testing.assert_allclose(reply["actions"], expected_vla_actions(server, obs, seed), rtol=1e-4, atol=1e-4)
        timing = reply["server_timing"]
        for stage in ("preprocess", "vlm", "denoise", "postprocess", "infer"):
            assert timing[f"{stage}_ms"] >= 0
        assert 0 < timing["denoise_ms"] <= timing["infer_ms"]
    with pytest.raises(RuntimeError, match="field 'state'"):          # an error reply; the connection survives
        policy.infer(dict(obs, state=np.zeros(3, np.float32)))
    assert policy.infer(obs)["actions"].shape == (16, 14)


def test_our_client_batches_modes_and_message_auth(server):
    rng = np.random.default_rng(2)
    with MotusClient(server["host"], server["port"], api_key=server["key"], api_key_in_message=True) as client:
        batch = {"image": rng.integers(0, 256, (3,) + IMAGE + (3,), dtype=np.uint8),
                 "state": rng.standard_normal((3, 14)).astype(np.float32), "prompt": ["a", "b", "a"]}
        assert client.infer(batch)["actions"].shape == (3, 16, 14)
        obs = observation(rng)
        frames = client.infer(dict(obs, mode="world_model", actions=rng.standard_normal((16, 14)),
                                   return_frames=True))["frames"]
        assert frames.shape == (5,) + IMAGE + (3,) and frames.dtype == np.uint8
        idm = client.infer(dict(obs, mode="idm", future_frames=np.zeros((4,) + IMAGE + (3,), np.uint8)))
        assert idm["actions"].shape == (16, 14) and np.isfinite(idm["actions"]).all()
        assert client.infer(dict(obs, mode="video"))["video_latents"].shape[1:] == (2, 4, 4)
        with pytest.raises(ServerError, match="field 'mode'"):
            client.infer(dict(obs, mode="teleport"))


def test_real_time_chunking_end_to_end(server):
    rng = np.random.default_rng(3)
    with MotusClient(server["host"], server["port"], api_key=server["key"]) as client:
        broker = ActionChunkBroker(client, execute_steps=8, real_time_chunking=True, inference_delay=3)
        obs = observation(rng, noise_seed=11)
        first = [broker.infer(obs)["actions"] for _ in range(8)]
        chunk1 = broker.last_response["actions"]
        second = broker.infer(dict(obs, image=rng.integers(0, 256, IMAGE + (3,), dtype=np.uint8)))
        chunk2 = broker.last_response["actions"]
    np.testing.assert_array_equal(np.stack(first), chunk1[:8])
    np.testing.assert_array_equal(second["actions"], chunk2[0])
    # the 3 actions the robot executes while waiting are exactly the previous chunk's (raw units)
    np.testing.assert_allclose(chunk2[:3], chunk1[8:11], rtol=1e-4, atol=1e-4)


def hostile_messages(good: dict, rng) -> list[tuple[str, str, bytes]]:
    """200 (name, how, payload): how = "message" (on an authenticated connection), "text" (a text frame),
    "bad_header" (connect with a wrong key), "bad_first_message" (connect without a key, send payload first)."""
    P = wire.pack
    drop = object()

    def w(**kw):
        d = dict(good, **kw)
        return {k: v for k, v in d.items() if v is not drop}

    def nd(dtype, shape, data):
        return P(dict(good, image={b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}))

    def rand_dim():
        return int(rng.choice([d for d in range(1, 40) if d != 14]))

    m = "message"
    templates = [
        ("unknown key", m, lambda: P(w(**{f"k{rng.integers(1e6)}": 1}))),
        ("missing image", m, lambda: P(w(image=drop))),
        ("missing prompt", m, lambda: P(w(prompt=drop))),
        ("missing state", m, lambda: P(w(state=drop))),
        ("float image", m, lambda: P(w(image=rng.random(IMAGE + (3,)).astype(np.float32)))),
        ("image size", m, lambda: P(w(image=np.zeros((rand_dim(), 64, 3), np.uint8)))),
        ("image channels", m, lambda: P(w(image=np.zeros(IMAGE + (4,), np.uint8)))),
        ("batch too big", m, lambda: P(w(image=np.zeros((9,) + IMAGE + (3,), np.uint8)))),
        ("int state", m, lambda: P(w(state=np.zeros(14, np.int64)))),
        ("state dim", m, lambda: P(w(state=np.zeros(rand_dim(), np.float32)))),
        ("list state", m, lambda: P(w(state=[0.0] * 14))),
        ("string state", m, lambda: P(w(state="zeros"))),
        ("NaN state", m, lambda: P(w(state=np.where(np.arange(14) == rng.integers(14), np.nan, 0).astype(np.float32)))),
        ("inf state", m, lambda: P(w(state=np.full(14, -np.inf, np.float32)))),
        ("huge state value", m, lambda: P(w(state=np.full(14, 3e38, np.float32)))),
        ("big wrong-shape array", m, lambda: P(w(state=np.zeros(200_000, np.float32)))),
        ("int prompt", m, lambda: P(w(prompt=int(rng.integers(1e9))))),
        ("bytes prompt", m, lambda: P(w(prompt=b"pick"))),
        ("long prompt", m, lambda: P(w(prompt="x" * 5000))),
        ("list prompt", m, lambda: P(w(prompt=["a", "b"]))),
        ("unknown mode", m, lambda: P(w(mode="mode" + str(rng.integers(100))))),
        ("int mode", m, lambda: P(w(mode=3))),
        ("bad steps", m, lambda: P(w(steps=int(rng.choice([0, -1, 51, 10**12]))))),
        ("float steps", m, lambda: P(w(steps=2.0))),
        ("bool steps", m, lambda: P(w(steps=True))),
        ("negative seed", m, lambda: P(w(noise_seed=-int(rng.integers(1, 1e9))))),
        ("num_frames", m, lambda: P(w(num_frames=int(rng.choice([0, -1, 17, 10**6]))))),
        ("frames in vla", m, lambda: P(w(return_frames=True))),
        ("actions in vla", m, lambda: P(w(actions=np.zeros((16, 14))))),
        ("world_model without actions", m, lambda: P(w(mode="world_model"))),
        ("NaN actions", m, lambda: P(w(mode="world_model", actions=np.full((16, 14), np.nan)))),
        ("idm without frames", m, lambda: P(w(mode="idm"))),
        ("idm frame count", m, lambda: P(w(mode="idm", future_frames=np.zeros((3,) + IMAGE + (3,), np.uint8)))),
        ("prev_actions too long", m, lambda: P(w(prev_actions=np.zeros((17, 14), np.float32)))),
        ("NaN prev_actions", m, lambda: P(w(prev_actions=np.full((4, 14), np.nan, np.float32)))),
        ("delay beyond prefix", m, lambda: P(w(prev_actions=np.zeros((4, 14), np.float32), inference_delay=5))),
        ("delay without prefix", m, lambda: P(w(inference_delay=1))),
        ("api_key field later", m, lambda: P(w(api_key="x"))),
        ("declared huge shape", m, lambda: nd("|u1", [2**20, 2**20, 3], b"\x00" * 12)),
        ("negative shape", m, lambda: nd("|u1", [-64, 64, 3], b"")),
        ("object dtype", m, lambda: nd("|O", [1], b"\x00" * 8)),
        ("void dtype", m, lambda: nd("|V12288", [1], b"\x00" * 12288)),
        ("structured dtype", m, lambda: nd("[('a','<f4')]", [1], b"\x00" * 4)),
        ("byte-count mismatch", m, lambda: nd("|u1", [64, 64, 3], b"\x00" * int(rng.integers(0, 12287)))),
        ("truncated", m, lambda: P(good)[: int(rng.integers(1, len(P(good)) - 1))]),
        ("random bytes", m, lambda: rng.bytes(int(rng.integers(1, 4096)))),
        ("not a map", m, lambda: P([None, 42, "str", [1, 2]][int(rng.integers(4))])),
        ("int map key", m, lambda: msgpack.packb({1: 2})),
        ("ext type", m, lambda: msgpack.packb(msgpack.ExtType(int(rng.integers(0, 127)), b"abc"))),
        ("nesting bomb", m, lambda: b"\x91" * 200_000 + b"\x01"),
        ("4G array header", m, lambda: b"\xdd\xff\xff\xff\xff"),
        ("oversize message", m, lambda: rng.bytes(MAX_MESSAGE + 1 + int(rng.integers(0, 2**19)))),
        ("text frame", "text", lambda: "{\"image\": 1}"),
        ("wrong key header", "bad_header", lambda: b""),
        ("wrong key message", "bad_first_message", lambda: P({"api_key": secrets.token_hex(16)})),
        ("garbage first message", "bad_first_message", lambda: rng.bytes(64)),
    ]
    out = [(name, how, make()) for name, how, make in templates]
    while len(out) < 200:
        name, how, make = templates[int(rng.integers(len(templates)))]
        out.append((name, how, make()))
    return out


def test_hostile_messages_get_errors_and_the_server_survives(server):
    host, port, key = server["host"], server["port"], server["key"]
    uri, header = f"ws://{host}:{port}", {"Authorization": f"Api-Key {key}"}
    rng = np.random.default_rng(4)
    good = observation(rng)

    def connect():
        ws = websockets.sync.client.connect(uri, additional_headers=header, max_size=None,
                                            compression=None).__enter__()
        wire.unpack(ws.recv())                                          # metadata
        return ws

    ws, outcomes = connect(), {"error": 0, "closed": 0, "refused": 0}
    messages = hostile_messages(good, rng)
    assert len(messages) == 200
    for name, how, payload in messages:
        if how == "bad_header":
            with pytest.raises(InvalidStatus) as e:
                websockets.sync.client.connect(uri, additional_headers={"Authorization": "Api-Key wrong"})
            assert e.value.response.status_code == 401
            outcomes["refused"] += 1
            continue
        if how == "bad_first_message":
            with websockets.sync.client.connect(uri, max_size=None) as anon:
                anon.send(payload)
                reply = anon.recv(timeout=30)
                assert isinstance(reply, str) and "authentication failed" in reply, name
                with pytest.raises(ConnectionClosed):
                    anon.recv(timeout=30)
                assert anon.close_code == 1008
            outcomes["closed"] += 1
            continue
        try:
            ws.send(payload)
            reply = ws.recv(timeout=30)
        except ConnectionClosed:
            assert ws.close_code in (1009, 1008), f"{name}: closed with {ws.close_code}"
            outcomes["closed"] += 1
            ws = connect()
            continue
        assert isinstance(reply, str) and reply.startswith("error: "), f"{name}: got {reply!r:.200}"
        assert "internal error" not in reply, f"{name}: {reply}"         # refused by validation, not by luck
        outcomes["error"] += 1
    # afterwards a good request still succeeds, on the old connection and on a new one
    ws.send(wire.pack(good))
    assert wire.unpack(ws.recv(timeout=30))["actions"].shape == (16, 14)
    ws.close()
    with MotusClient(host, port, api_key=key) as client:
        assert client.infer(good)["actions"].shape == (16, 14)
    assert server["proc"].poll() is None
    print("hostile outcomes:", outcomes)
    assert sum(outcomes.values()) == 200 and outcomes["error"] >= 150, outcomes


def test_load_8_clients_x_50_requests(server, openpi_client, record_property):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    latencies, server_ms, failures = [], [], []
    lock = threading.Lock()

    def client(i):
        rng = np.random.default_rng(100 + i)
        try:
            policy = WebsocketClientPolicy(host=server["host"], port=server["port"], api_key=server["key"])
        except Exception as e:  # noqa: BLE001
            with lock:
                failures.append(f"client {i} connect: {e!r}")
            return
        for n in range(50):
            obs = observation(rng, prompt=["pick", "place", "push"][n % 3])
            t = time.perf_counter()
            try:
                reply = policy.infer(obs)
                assert reply["actions"].shape == (16, 14) and np.isfinite(reply["actions"]).all()
            except Exception as e:  # noqa: BLE001
                with lock:
                    failures.append(f"client {i} request {n}: {e!r}")
                continue
            with lock:
                latencies.append((time.perf_counter() - t) * 1e3)
                server_ms.append(reply["server_timing"]["infer_ms"])
        policy._ws.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    assert not failures, failures[:5]
    assert len(latencies) == 400
    p50, p99 = np.percentile(latencies, [50, 99])
    s50, s99 = np.percentile(server_ms, [50, 99])
    report = (f"load 8 clients x 50 requests (tiny, {STEPS} steps, CPU): client round trip p50 {p50:.1f} ms, p99 "
              f"{p99:.1f} ms; server infer p50 {s50:.1f} ms, p99 {s99:.1f} ms; {400 / wall:.1f} req/s")
    print(report)
    record_property("load_report", report)
