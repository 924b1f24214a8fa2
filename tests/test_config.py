import pytest
import torch

from motus_fast.config import PRESETS, MotusConfig, get_preset
from motus_fast.model import Motus


def test_motus_8b_parameter_counts_match_upstream():
    """Upstream: video (Wan2.2-TI2V-5B) 5.00B, action expert 641.5M, und expert 253.5M (within 0.5%)."""
    with torch.device("meta"):
        counts = Motus(get_preset("motus-8b")).param_counts()
    for expert, want in (("video", 5.00e9), ("action", 641.5e6), ("und", 253.5e6)):
        assert abs(counts[expert] / want - 1) < 0.005, (expert, counts[expert], want)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_roundtrip(name):
    cfg = get_preset(name)
    assert MotusConfig.from_dict(cfg.to_dict()) == cfg
    with torch.device("meta"):
        m = Motus(cfg)
    assert len(m.blocks) == cfg.num_layers and m.cfg.head_dim * m.cfg.num_heads == cfg.video.dim


def test_override_dotted_fields():
    cfg = get_preset("tiny").override({"num_layers": 3, "action.dim": 64, "action.layout": "pretrain"})
    assert cfg.num_layers == 3 and cfg.action.dim == 64 and cfg.action.layout == "pretrain"
    assert get_preset("tiny").num_layers == 2  # presets are immutable
    with pytest.raises(KeyError, match="action.nope"):
        cfg.override({"action.nope": 1})
    with pytest.raises(ValueError, match="divisible"):
        cfg.override({"video.num_heads": 3})
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("huge")
