"""The Wan2.2 VAE (frames <-> 48-channel latents, stride 4 x 16 x 16) as diffusers ``AutoencoderKLWan``.

``load_wan_vae`` reads either public layout into the same diffusers module (raw: no latent normalisation):
- the original release file ``Wan2.2_VAE.pth`` (a plain state dict of the release's ``WanVAE_``; no config, so the
  sizes are read from the tensor shapes, the decoder width separately from the encoder width), renamed onto the
  diffusers keys as diffusers' own ``convert_vae_22`` does (no transposes, no reshapes);
- a diffusers folder (``vae/`` of Wan2.2-TI2V-5B-Diffusers, or the pipeline folder itself).
Both are built on the meta device and filled tensor by tensor from the memory-mapped file (no second copy).

``WanVAE`` adds what the release keeps outside the network: ``(mu - mean) * (1 / std)`` with ``1 / std`` computed
in float32 (the 48 constants are literals in the release), the posterior mean (no sampling), and the inverse on
decode. diffusers' encode/decode already run the release's temporal chunking (frame 0 alone, then 4 frames per
step with causal caches) and clamp the decoded video to [-1, 1].
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from motus_fast.encoders.files import component_dir, freeze, is_torch_file, read_json
from motus_fast.weights.mapping import CheckpointError, Rule, convert
from motus_fast.weights.sources import open_weights

Tensor = torch.Tensor

# The release's hard-coded latent statistics (wan/modules/vae2_2.py, Wan2_2_VAE.__init__), z_dim 48.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891, 0.157,
    -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322,
    0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052,
    0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165,
    0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917,
    0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06,
    0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
ORIGINAL_VAE_FILE = "Wan2.2_VAE.pth"


# ---- the original release file -> diffusers keys ------------------------------------------------------------------
_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}


_BLOCKS = ((r"^conv_in\.", "conv1."), (r"^norm_out\.gamma$", "head.0.gamma"), (r"^conv_out\.", "head.2."),
           (r"^mid_block\.attentions\.0\.", "middle.1."), (r"^mid_block\.resnets\.0\.", "middle.0."),
           (r"^mid_block\.resnets\.1\.", "middle.2."),
           (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", r"downsamples.\1.downsamples.\2."),
           (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", r"upsamples.\1.upsamples.\2."))
_RESBLOCK = r"^((?:middle\.[02]|(?:down|up)samples\.\d+\.(?:down|up)samples\.\d+)\.)"


def original_vae_key(key: str, num_res_blocks: int) -> str:
    """The release (``WanVAE_``) name of a diffusers ``AutoencoderKLWan`` (Wan2.2 style) key."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    side, rest = key.split(".", 1)
    if side in top:
        return f"{top[side]}.{rest}"
    blocks = _BLOCKS + ((r"^down_blocks\.(\d+)\.downsampler\.", rf"downsamples.\1.downsamples.{num_res_blocks}."),
                        (r"^up_blocks\.(\d+)\.upsampler\.", rf"upsamples.\1.upsamples.{num_res_blocks + 1}."))
    for pattern, repl in blocks:
        rest, n = re.subn(pattern, repl, rest)
        if n:
            break
    for ours, theirs in _RESNET.items():          # inside a residual block: the release's nn.Sequential indices
        rest = re.sub(_RESBLOCK + re.escape(ours) + r"(\.|$)", rf"\1{theirs}\2", rest)
    return f"{side}.{rest}"


def original_vae_config(src, name: str) -> dict:
    """``AutoencoderKLWan`` config of a release ``Wan2.2_VAE.pth``, read from its tensor shapes."""
    keys = set(src.keys())

    def shape(key: str):
        if key not in keys:
            raise CheckpointError(f"{name}: no {key!r}; not an original Wan2.2 VAE checkpoint (a diffusers vae/ "
                                  "folder loads as such)")
        return src.shape(key)

    base, in_ch = shape("encoder.conv1.weight")[:2]
    z_dim = shape("conv2.weight")[0]
    levels = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.downsamples.")})
    nrb = len({k.split(".")[4] for k in keys if k.startswith("encoder.downsamples.0.downsamples.")
               and ".residual." in k})
    dim_mult = [shape(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0] // base for i in levels]
    temporal = [f"encoder.downsamples.{i}.downsamples.{nrb}.time_conv.weight" in keys for i in levels[:-1]]
    dec_base = shape("decoder.conv1.weight")[0] // dim_mult[-1]
    if in_ch != 12:
        raise CheckpointError(f"{name}: encoder.conv1.weight takes {in_ch} input channels; a Wan2.2 VAE takes 12 "
                              "(3 colours x 2 x 2 patchified pixels). A Wan2.1 VAE is not supported here")
    if z_dim != len(WAN22_LATENTS_MEAN):
        raise CheckpointError(f"{name}: conv2.weight says z_dim {z_dim}; the release's latent statistics exist for "
                              f"z_dim {len(WAN22_LATENTS_MEAN)} only")
    return dict(base_dim=base, decoder_base_dim=dec_base, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=nrb,
                attn_scales=[], temperal_downsample=temporal, dropout=0.0, is_residual=True, in_channels=in_ch,
                out_channels=shape("decoder.head.2.weight")[0], patch_size=2, scale_factor_temporal=4,
                scale_factor_spatial=16, latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))


# ---- public loader -----------------------------------------------------------------------------------------------
def resolve_vae_path(path: str | Path) -> Path:
    """A ``.pth`` file, a diffusers vae folder, a diffusers pipeline folder (its ``vae/``) or an original release
    folder (its ``Wan2.2_VAE.pth``)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() or (p.is_dir() and (p / ORIGINAL_VAE_FILE).is_file()):
        if (p / ORIGINAL_VAE_FILE).is_file():
            return p / ORIGINAL_VAE_FILE
        if (p / "vae").is_dir():
            return p / "vae"
    if p.is_dir() and (p / "model_index.json").is_file() and (p / "vae").is_dir():
        return p / "vae"
    return p


def vae_folder(path: Path) -> tuple[Path, dict]:
    """A diffusers VAE folder and its config, checked to be an ``AutoencoderKLWan``."""
    folder = component_dir(path, "the Wan VAE", "vae")
    cfg = read_json(folder / "config.json")
    if cfg.get("_class_name") != "AutoencoderKLWan":
        raise CheckpointError(f"{folder / 'config.json'}: _class_name {cfg.get('_class_name')!r} is not "
                              "'AutoencoderKLWan'")
    return folder, cfg


def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device=None, progress: bool = True):
    """The Wan2.2 VAE as diffusers ``AutoencoderKLWan`` (raw: no latent normalisation), frozen, eval, `dtype`, from
    the release's ``Wan2.2_VAE.pth`` or a diffusers folder (see ``resolve_vae_path``)."""
    from diffusers import AutoencoderKLWan

    p = resolve_vae_path(path)
    if p.is_file() or is_torch_file(p):
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        with open_weights(p) as src:
            cfg = original_vae_config(src, str(p))
            with torch.device("meta"):
                vae = AutoencoderKLWan.from_config(cfg)
            expected = {k: v.shape for k, v in vae.state_dict().items()}
            rules = [Rule(k, (original_vae_key(k, cfg["num_res_blocks"]),)) for k in expected]
            tensors = convert(src, rules, expected, None, dtype, progress="vae" if progress else None,
                              header=f"{p}: Wan2.2 VAE checkpoint does not match the sizes read from it:")
    else:
        folder, cfg = vae_folder(p)
        with torch.device("meta"):
            vae = AutoencoderKLWan.from_config(cfg)
        expected = {k: v.shape for k, v in vae.state_dict().items()}
        with open_weights(folder, prefer=("diffusion_pytorch_model",)) as src:
            tensors = convert(src, [Rule(k, (k,)) for k in expected], expected, None, dtype,
                              progress="vae" if progress else None,
                              header=f"{folder}: Wan VAE checkpoint does not match its config.json:")
    vae.load_state_dict(tensors, strict=True, assign=True)
    vae = freeze(vae)
    return vae if device is None else vae.to(device)


# ---- with the release's latent normalisation ----------------------------------------------------------------------
class WanVAE(nn.Module):
    """diffusers ``AutoencoderKLWan`` + the release's latent normalisation: video in [-1, 1] <-> normalised latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = freeze(vae)
        c = vae.config
        self.latent_channels = int(c.z_dim)
        self.temporal_stride = int(getattr(c, "scale_factor_temporal", 4))
        self.spatial_stride = int(getattr(c, "scale_factor_spatial", 8))
        mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(c.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)  # fp32, as the release
        if mean.shape[1] != self.latent_channels or inv_std.shape[1] != self.latent_channels:
            raise ValueError(f"VAE latents_mean/std have {mean.shape[1]}/{inv_std.shape[1]} entries; z_dim is "
                             f"{self.latent_channels}")
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_inv_std", inv_std, persistent=False)

    def check_clip(self, T: int, H: int, W: int) -> None:
        if (T - 1) % self.temporal_stride:
            raise ValueError(f"the VAE encodes 1 + {self.temporal_stride}n frames; got a clip of {T} (set "
                             f"num_video_frames to a multiple of {self.temporal_stride})")
        if H % self.spatial_stride or W % self.spatial_stride:
            raise ValueError(f"frame size {H}x{W} is not divisible by the VAE stride {self.spatial_stride}")

    @torch.no_grad()
    def encode_raw(self, video: Tensor) -> Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> posterior mean before normalisation (fp32)."""
        self.check_clip(*video.shape[2:])
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(video.to(dtype)).latent_dist.mode().float()

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, 1 + (T-1)/st, H/ss, W/ss] (fp32)."""
        return (self.encode_raw(video) - self.latents_mean) * self.latents_inv_std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """normalised latents -> video [B, 3, T, H, W] clamped to [-1, 1] (fp32)."""
        dtype = next(self.vae.parameters()).dtype
        x = latents.float() / self.latents_inv_std + self.latents_mean
        return self.vae.decode(x.to(dtype)).sample.float()
