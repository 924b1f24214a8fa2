"""The server's handshake rules, in process: healthz, unknown paths, the connection limit, no-key metadata."""

import http.client

import numpy as np
import pytest
import torch
import websockets.sync.client
from websockets.exceptions import InvalidStatus

from motus_fast.config import get_preset
from motus_fast.encoders import StubEncoders
from motus_fast.infer import InferenceEngine
from motus_fast.model import Motus
from motus_fast.serve.client import MotusClient, healthz
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.policy import MotusPolicy
from motus_fast.serve.server import PolicyServer


@pytest.fixture(scope="module")
def running():
    torch.manual_seed(0)
    model = Motus(get_preset("tiny").override({"num_layers": 1}))
    engine = InferenceEngine(model, StubEncoders(model.cfg, (32, 32)), steps=1)
    config = ServeConfig(port=0, max_connections=1)
    with PolicyServer(MotusPolicy(engine, config), config).start_in_thread() as srv:
        yield srv


def test_handshake_rules(running):
    assert running.server.config.host == "127.0.0.1"
    assert healthz("127.0.0.1", running.port)
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    conn.request("GET", "/metrics")
    assert conn.getresponse().status == 404
    conn.close()
    with MotusClient("127.0.0.1", running.port) as client:          # no key configured: metadata at once
        assert client.metadata["action_horizon"] == 16 and client.metadata["image_shape"] == [32, 32, 3]
        with pytest.raises(InvalidStatus) as e:                      # max_connections=1
            websockets.sync.client.connect(f"ws://127.0.0.1:{running.port}")
        assert e.value.response.status_code == 503
        obs = {"image": np.zeros((32, 32, 3), np.uint8), "state": np.zeros(14, np.float32), "prompt": "x"}
        assert client.infer(obs)["actions"].shape == (16, 14)
    assert running.server.requests_ok == 1
