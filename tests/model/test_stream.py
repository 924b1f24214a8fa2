"""model.layers.Stream: a stream with a pending residual branch gives, through the next AdaLN, what adding the branch
first and then normalising gives (the layer-by-layer computation of upstream), on every backend."""

import pytest
import torch

from motus_fast.model.layers import Stream
from motus_fast.ops.adaln import adaln_modulate_reference


@pytest.mark.parametrize("case", ["fresh", "gated", "ungated", "unmodulated"])
def test_modulate_adds_the_branch_then_normalises(case, backend):
    g = torch.Generator().manual_seed(3)
    B, L, D = 2, 7, 64
    x, y = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    gate, shift, scale = (torch.randn(B, 1, D, generator=g) for _ in range(3))
    stream = {"fresh": Stream(x), "gated": Stream(x, y, gate), "ungated": Stream(x, y),
              "unmodulated": Stream(x.reshape(B * L, D), y.reshape(B * L, D))}[case]
    if case == "unmodulated":
        shift = scale = None
    want_x = {"fresh": x, "gated": x + y * gate, "ungated": x + y, "unmodulated": (x + y).reshape(B * L, D)}[case]
    got_x, got_h = stream.modulate(shift, scale, 1e-6)
    torch.testing.assert_close(stream.value(), want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, adaln_modulate_reference(want_x.double(), shift, scale, 1e-6).float(),
                               rtol=1e-5, atol=1e-5)
