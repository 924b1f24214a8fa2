"""`motus-fast stats` and `motus-fast encode-text` end to end."""

import json

import numpy as np

from motus_fast.data.config import DataConfig
from motus_fast.data.norm import load_stats
from motus_fast.data.text_cache import TextCache
from motus_fast.data.tiny import tiny_pyramid, write_tiny_lerobot
from motus_fast.data.windows import WindowSpec


def run(argv):
    from motus_fast.cli import main
    assert main(argv) == 0


def test_stats_command(tmp_path, capsys):
    root = write_tiny_lerobot(tmp_path / "arm", episodes=2, frames=20, height=32, width=32, state_dim=5, action_dim=3)
    run(["stats", "--dataset", str(root), "--out", str(tmp_path / "stats.json")])
    stats = load_stats(tmp_path / "stats.json")["arm"]
    from motus_fast.data.lerobot import LeRobotV3Source
    src = LeRobotV3Source(root)
    acts = np.concatenate([src.read_lowdim(e, "action") for e in range(2)]).astype(np.float64)
    np.testing.assert_allclose(stats.action.mean, acts.mean(0), rtol=1e-6)
    assert stats.state.dim == 5 and stats.action.key == "action"
    assert "wrote" in capsys.readouterr().out


def test_stats_and_text_cache_from_a_data_config(tmp_path):
    cfgs = tiny_pyramid(tmp_path / "pyr", window=WindowSpec(2, 2, 1), height=32, width=32, episodes=2, frames=12)
    cfg_path = tmp_path / "data.json"
    cfg_path.write_text(json.dumps(cfgs[2].to_dict()))
    run(["stats", "--config", str(cfg_path), "--out", str(tmp_path / "stats.json")])
    stats = load_stats(tmp_path / "stats.json")
    assert stats["robots"].action.key == "latent_actions" and stats["robots"].state is None
    assert stats["videos"].action is None
    run(["encode-text", "--config", str(cfg_path), "--text-encoder", "tiny", "--out", str(tmp_path / "t.safetensors")])
    cache = TextCache(tmp_path / "t.safetensors")
    assert "a moving square" in cache and "follow the path" in cache
    assert cache.get("follow the path").shape[1] == 64      # the tiny preset's text_dim
    # the normalised stage-2 data reads with these stats
    from motus_fast.data.mixture import build_mixture
    import dataclasses
    norm = dataclasses.replace(DataConfig.from_dict(cfgs[2].to_dict()), normalization="mean_std",
                               stats_path=str(tmp_path / "stats.json"), text_cache=str(tmp_path / "t.safetensors"))
    s = build_mixture(norm).datasets[1][0]
    assert s.text is not None and abs(float(s.actions.mean())) < 3
