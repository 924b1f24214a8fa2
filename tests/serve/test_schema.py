"""Request validation names the offending field; normalization round-trips; the broker chunks and asks for RTC."""

import numpy as np
import pytest

from motus_fast.data.norm import DatasetStats, FeatureStats, stats_to_json
from motus_fast.serve.broker import ActionChunkBroker
from motus_fast.serve.config import ServeConfig
from motus_fast.serve.normalization import Normalizer
from motus_fast.serve.schema import RequestSpec, ValidationError, validate

SPEC = RequestSpec(image_size=(32, 64), frame_stride=4, horizon=8, action_dim=3, state_dim=5,
                   config=ServeConfig(max_batch=4, max_steps=20, max_num_frames=6))


def good(batch=None):
    lead = () if batch is None else (batch,)
    return {"image": np.zeros(lead + (32, 64, 3), np.uint8), "state": np.zeros(lead + (5,), np.float32),
            "prompt": "pick" if batch is None else ["pick"] * batch}


def test_good_requests():
    r = validate(good(), SPEC)
    assert (r.mode, r.batched, r.batch, r.num_frames, r.images.shape, r.state.shape) == \
        ("vla", False, 1, 2, (1, 32, 64, 3), (1, 5))
    r = validate(dict(good(3), mode="world_model", actions=np.ones((3, 8, 3)), return_frames=True, steps=np.int64(4),
                      noise_seed=7), SPEC)
    assert r.batch == 3 and r.actions.shape == (3, 8, 3) and r.steps == 4 and r.return_frames
    r = validate(dict(good(), mode="idm", future_frames=np.zeros((8, 32, 64, 3), np.uint8)), SPEC)
    assert r.num_frames == 3 and r.future_frames.shape == (1, 8, 32, 64, 3)
    r = validate(dict(good(), prev_actions=np.ones((5, 3), np.float64), inference_delay=2), SPEC)
    assert r.prev_actions.shape == (1, 5, 3) and r.inference_delay == 2


BAD = [
    ({"imagee": 1}, "imagee"),
    ({"image": None}, "image"),
    ({"image": np.zeros((32, 64, 3), np.float32)}, "image"),
    ({"image": np.zeros((32, 63, 3), np.uint8)}, "image"),
    ({"image": np.zeros((5, 32, 64, 3), np.uint8)}, "image"),          # batch above max_batch
    ({"image": np.zeros((0, 32, 64, 3), np.uint8)}, "image"),
    ({"image": [[0]]}, "image"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),                                    # a list for an unbatched request
    ({"prompt": "x" * 1001}, "prompt"),
    ({"state": None}, "state"),
    ({"state": np.zeros(5, np.int64)}, "state"),
    ({"state": np.zeros(6, np.float32)}, "state"),
    ({"state": np.zeros((1, 5), np.float32)}, "state"),
    ({"state": np.array([0, 0, np.nan, 0, 0], np.float32)}, "state"),
    ({"state": np.array([0, 0, np.inf, 0, 0], np.float32)}, "state"),
    ({"state": np.full(5, 1e5, np.float32)}, "state"),
    ({"state": [0.0] * 5}, "state"),
    ({"mode": "dream"}, "mode"),
    ({"mode": 1}, "mode"),
    ({"actions": np.zeros((8, 3))}, "actions"),                       # not world_model
    ({"mode": "world_model"}, "actions"),
    ({"mode": "world_model", "actions": np.zeros((7, 3))}, "actions"),
    ({"mode": "idm"}, "future_frames"),
    ({"mode": "idm", "future_frames": np.zeros((3, 32, 64, 3), np.uint8)}, "future_frames"),
    ({"mode": "idm", "future_frames": np.zeros((24, 32, 64, 3), np.uint8)}, "future_frames"),
    ({"future_frames": np.zeros((4, 32, 64, 3), np.uint8)}, "future_frames"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 1, "mode": "video"}, "num_frames"),          # only vla runs on the condition alone
    ({"num_frames": 7}, "num_frames"),
    ({"num_frames": 2.0}, "num_frames"),
    ({"steps": 0}, "steps"),
    ({"steps": True}, "steps"),
    ({"steps": 21}, "steps"),
    ({"noise_seed": -1}, "noise_seed"),
    ({"return_frames": True}, "return_frames"),                      # vla predicts no video
    ({"return_frames": "yes", "mode": "video"}, "return_frames"),
    ({"prev_actions": np.zeros((9, 3))}, "prev_actions"),
    ({"prev_actions": np.zeros((0, 3))}, "prev_actions"),
    ({"prev_actions": np.zeros((4, 3)), "mode": "video"}, "prev_actions"),
    ({"prev_actions": np.zeros((4, 3)), "inference_delay": 5}, "inference_delay"),
    ({"inference_delay": 1}, "inference_delay"),
    ({"api_key": "secret"}, "api_key"),                              # only as the first message
]


@pytest.mark.parametrize("change,field", BAD)
def test_bad_requests_name_the_field(change, field):
    obs = good()
    obs.update(change)
    obs = {k: v for k, v in obs.items() if not (v is None and k in ("image", "prompt", "state"))}
    with pytest.raises(ValidationError) as e:
        validate(obs, SPEC)
    assert e.value.field == field and f"field {field!r}" in str(e.value)


def test_batched_fields_must_agree():
    with pytest.raises(ValidationError, match="'state'"):
        validate(dict(good(2), state=np.zeros((3, 5), np.float32)), SPEC)
    with pytest.raises(ValidationError, match="'prompt'"):
        validate(dict(good(2), prompt="one"), SPEC)
    with pytest.raises(ValidationError, match="'<message>'"):
        validate([1, 2], SPEC)


def stats(rng, dim):
    return FeatureStats.compute(rng.standard_normal((50, dim)) * 3 + 1)


def test_normalizer_from_checkpoint_extra():
    rng = np.random.default_rng(0)
    doc = stats_to_json({"robot": DatasetStats(state=stats(rng, 5), action=stats(rng, 3))})
    norm = Normalizer.from_extra({"norm_stats": doc, "norm_mode": "mean_std"})
    norm.check_dims(5, 3)
    x = rng.standard_normal((2, 8, 3))
    np.testing.assert_allclose(norm.actions_out(norm.actions_in(x)), x, rtol=1e-5, atol=1e-5)
    s = norm.state_in(np.ones((1, 5)))
    np.testing.assert_allclose(s[0], (1 - norm.state.mean) / norm.state.std, rtol=1e-6)
    with pytest.raises(ValueError, match="no valid mode"):
        Normalizer.from_extra({"norm_stats": doc})
    with pytest.raises(ValueError, match="no statistics for dataset"):
        Normalizer.from_extra({"norm_stats": doc, "norm_mode": "quantile"}, dataset="other")
    with pytest.raises(ValueError, match="action statistics"):
        norm.check_dims(5, 4)
    assert Normalizer.from_extra({}).mode == "none"


class FakePolicy:
    def __init__(self, horizon=6, dim=2):
        self.requests, self.horizon, self.dim = [], horizon, dim

    def infer(self, obs):
        self.requests.append(obs)
        n = len(self.requests)
        chunk = np.arange(self.horizon * self.dim, dtype=np.float32).reshape(self.horizon, self.dim)
        return {"actions": chunk + 100 * n}

    def reset(self):
        pass


def test_broker_executes_steps_then_refreshes():
    policy = FakePolicy()
    broker = ActionChunkBroker(policy, execute_steps=4)
    got = [broker.infer({"t": t}) for t in range(9)]
    assert [len(policy.requests), [g["chunk_step"] for g in got]] == [3, [0, 1, 2, 3, 0, 1, 2, 3, 0]]
    np.testing.assert_array_equal(got[5]["actions"], np.array([2, 3], np.float32) + 200)
    assert "prev_actions" not in policy.requests[1]
    broker.reset()
    broker.infer({})
    assert len(policy.requests) == 4


def test_broker_sends_the_rest_of_the_chunk_for_rtc():
    policy = FakePolicy()
    broker = ActionChunkBroker(policy, execute_steps=4, real_time_chunking=True, inference_delay=1)
    for _ in range(5):
        broker.infer({"prompt": "p"})
    second = policy.requests[1]
    first_chunk = np.arange(12, dtype=np.float32).reshape(6, 2) + 100
    np.testing.assert_array_equal(second["prev_actions"], first_chunk[4:])       # executed 4, 2 remain
    assert second["inference_delay"] == 1 and second["prompt"] == "p"
    with pytest.raises(ValueError, match="chunk"):
        ActionChunkBroker(FakePolicy(horizon=3), execute_steps=4).infer({})
