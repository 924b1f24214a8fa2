"""Loading streams the weights: a synthetic ~0.5B-parameter Wan2.2 VAE in the original release layout (a 2 GB
`Wan2.2_VAE.pth`, built at a smaller width than the release's 0.7B) loads into diffusers' AutoencoderKLWan with a
peak RSS growth of at most 1.2x the weights' bytes (no second full copy: the module is built on the meta device and
assigned views of the memory-mapped file)."""

import json
import subprocess
import sys
import textwrap

import torch

from motus_fast.encoders.wan_vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, original_vae_key

PROBE = textwrap.dedent("""
    import json, sys, torch
    import diffusers  # noqa: F401  (imported before the baseline: library code is not weights)
    from motus_fast.encoders import load_wan_vae

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    before = status("VmRSS:")
    vae = load_wan_vae(sys.argv[1], torch.float32, progress=False)
    n = sum(p.numel() for p in vae.parameters())
    print(json.dumps({"before": before, "peak": status("VmHWM:"), "bytes": n * 4}))
""")


def test_original_layout_vae_loads_without_a_second_copy(tmp_path):
    from diffusers import AutoencoderKLWan

    cfg = dict(base_dim=136, decoder_base_dim=216, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
               temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
               patch_size=2, scale_factor_spatial=16, latents_mean=list(WAN22_LATENTS_MEAN),
               latents_std=list(WAN22_LATENTS_STD))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKLWan(**cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {original_vae_key(k, 2): torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    n = sum(t.numel() for t in sd.values())
    assert 0.45e9 < n < 0.55e9
    torch.save(sd, tmp_path / "Wan2.2_VAE.pth")
    del sd
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "Wan2.2_VAE.pth")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    assert m["bytes"] == n * 4
    report = f"peak RSS grew {growth / 2**30:.2f} GiB for {m['bytes'] / 2**30:.2f} GiB of weights"
    print(report)
    assert growth <= 1.2 * m["bytes"], report
