"""WindowSpec against upstream's sampling loop (RobotWinTaskDataset._calculate_sampling_indices), re-stated here."""

import numpy as np
import pytest

from motus_fast.data.windows import WindowSpec


def upstream_indices(T, cond, F, r, g):
    """Upstream's loops for a given condition frame (upstream draws cond at random in 0..max(0, T - K g - 1))."""
    K = F * r
    actions = [min(cond + (i + 1) * g, T - 1) for i in range(K)]
    video = []
    for i in range(F):
        step = (i + 1) * r - 1
        video.append(actions[step] if step < len(actions) else actions[-1])
    return video, actions, max(0, T - K * g - 1)


@pytest.mark.parametrize("F,r,g", [(8, 2, 3), (4, 5, 3), (3, 1, 1), (1, 4, 2), (8, 2, 1)])
def test_matches_upstream(F, r, g):
    w = WindowSpec(F, r, g)
    assert w.chunk_size == F * r and w.clip_frames == F + 1
    rng = np.random.default_rng(F * 100 + r * 10 + g)
    for T in [2, 3, F * r * g, F * r * g + 1, F * r * g + 2, 97, int(rng.integers(2, 300))]:
        _, _, last = upstream_indices(T, 0, F, r, g)
        assert w.num_conditions(T) == last + 1
        for cond in {0, last, int(rng.integers(0, last + 1))}:
            video, actions, _ = upstream_indices(T, cond, F, r, g)
            v, a = w.indices(cond, T)
            assert v.tolist() == video and a.tolist() == actions, (T, cond)


def test_stride_and_short_episodes():
    w = WindowSpec(2, 2, 1, condition_stride=3)
    assert w.num_conditions(1) == 0 and w.num_conditions(0) == 0
    assert w.num_conditions(20) == (20 - 4 - 1) // 3 + 1
    assert [w.condition_frame(j) for j in range(3)] == [0, 3, 6]
    with pytest.raises(ValueError, match="global_downsample_rate"):
        WindowSpec(2, 2, 0)
