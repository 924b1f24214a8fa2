"""The bench suite's host-overhead tool: it must stub every Triton launch while it times, and restore them after."""

import json

import torch

from kernel_checks import DEVICE, interpreted


@interpreted
def test_host_overhead_stubs_launches_and_restores_them(tmp_path, triton_backend, poisoned_outputs):
    from bench.host_overhead import main, stubbed_launches
    from motus_fast.ops.flow_step import euler_step, euler_step_reference

    x, v = torch.randn(2, 4, 3, 2, 2, device=DEVICE), torch.randn(2, 4, 3, 2, 2, device=DEVICE)
    dt = torch.tensor(-0.25, device=DEVICE)
    with stubbed_launches():
        stubbed = euler_step([x], [v], dt)[0]
    assert torch.isnan(stubbed).all()                                   # no kernel wrote the (NaN-poisoned) output
    torch.testing.assert_close(euler_step([x], [v], dt)[0], euler_step_reference([x], [v], dt)[0])  # restored

    main(["--iters", "2", "--out-dir", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("host_overhead_*.json")).read_text())["rows"]
    assert len(rows) == 10 and {r["grad mode"] for r in rows} == {True, False}
    assert all(r["public op us"] > 0 and r["bare custom op us"] > 0 for r in rows)
