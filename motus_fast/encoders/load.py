"""The real encoders from the folders users download: which files a Wan2.2 folder holds (either public layout),
what each component is (read from headers and configs only, for ``motus-fast check``), and ``load_encoders``.

Layouts of Wan2.2-TI2V-5B:
- original release: ``Wan2.2_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/`` (tokenizer), plus
  the transformer's ``config.json`` + sharded safetensors;
- diffusers: ``model_index.json``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``transformer/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from motus_fast.encoders.files import is_torch_file, parameter_count, read_json
from motus_fast.encoders.frozen import FrozenEncoders
from motus_fast.encoders.qwen3_vl import Qwen3VLFeatures, load_qwen3_vl, load_qwen3_vl_prompt, qwen3_vl_folder
from motus_fast.encoders.umt5 import (ORIGINAL_T5_FILE, HFTokenize, UMT5TextEncoder, load_umt5, original_t5_config,
                                      resolve_umt5_path, umt5_folder, umt5_tokenizer_dir)
from motus_fast.encoders.wan_vae import (ORIGINAL_VAE_FILE, WanVAE, load_wan_vae, original_vae_config,
                                         resolve_vae_path, vae_folder)
from motus_fast.weights.mapping import CheckpointError
from motus_fast.weights.sources import open_weights

log = logging.getLogger("motus_fast")


@dataclass(frozen=True)
class WanFiles:
    """Where the VAE, the umT5 encoder and its tokenizer are in a Wan2.2 folder."""

    layout: str                 # "original" | "diffusers"
    vae: Path
    t5: Path
    tokenizer: Optional[Path]   # None: not found (an error when loading)


def wan_files(path: str | Path, t5: str | Path | None = None) -> WanFiles:
    """The files of a Wan2.2 folder in either layout; `t5`: a separate umT5 encoder (file or folder) instead."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory (--wan takes a Wan2.2-TI2V-5B folder: the original "
                              f"release with {ORIGINAL_VAE_FILE}, or the diffusers layout with vae/ and text_encoder/)")
    if p.is_file():           # a single VAE file; umT5 must then come from `t5`
        layout, vae, t5_default = "original", p, p.parent / ORIGINAL_T5_FILE
    elif (p / ORIGINAL_VAE_FILE).is_file():
        layout, vae, t5_default = "original", p / ORIGINAL_VAE_FILE, p / ORIGINAL_T5_FILE
    elif (p / "vae").is_dir() or (p / "model_index.json").is_file():
        layout, vae, t5_default = "diffusers", p / "vae", p / "text_encoder"
    else:
        raise CheckpointError(f"{p}: neither Wan2.2 layout: no {ORIGINAL_VAE_FILE} (original release) and no vae/ "
                              "folder (diffusers)")
    t5_path = resolve_umt5_path(t5) if t5 is not None else t5_default
    try:
        tokenizer = umt5_tokenizer_dir(t5 if t5 is not None else (t5_path if layout == "original" else p))
    except CheckpointError:
        tokenizer = None
    return WanFiles(layout, vae, t5_path, tokenizer)


def load_encoders(wan: str | Path, vlm: str | Path | None, *, t5: str | Path | None = None,
                  vlm_weights: Optional[Mapping[str, torch.Tensor]] = None, vlm_weights_name: str = "",
                  text_len: Optional[int] = None, image_size: Optional[tuple[int, int]] = None,
                  attend_padding: bool = True, dtype: torch.dtype = torch.bfloat16,
                  vae_dtype: torch.dtype = torch.float32, device=None, progress: bool = True) -> FrozenEncoders:
    """The Wan2.2 VAE and umT5 from `wan` (either layout; `t5` overrides the umT5 encoder) and Qwen3-VL from `vlm`
    (its weights from `vlm_weights`, e.g. an official Motus checkpoint's, when given) as ``FrozenEncoders``.
    The VAE runs in float32 by default, as the release does. `vlm` None: no VLM (stage 1)."""
    from transformers import AutoTokenizer

    files = wan_files(wan, t5)
    if files.tokenizer is None:
        raise CheckpointError(f"{wan}: no umT5 tokenizer (looked beside {files.t5}: tokenizer/, google/umt5-xxl/)")
    vae = WanVAE(load_wan_vae(files.vae, vae_dtype, device, progress))
    text = UMT5TextEncoder(load_umt5(files.t5, dtype, device, progress),
                           HFTokenize(AutoTokenizer.from_pretrained(str(files.tokenizer))), max(text_len or 512, 1))
    log.info("encoders: Wan2.2 VAE %s (%s layout, %s), umT5 %s (%s), tokenizer %s", files.vae, files.layout,
             vae_dtype, files.t5, dtype, files.tokenizer)
    features = None
    if vlm is not None:
        features = Qwen3VLFeatures(load_qwen3_vl(vlm, dtype, device, weights=vlm_weights,
                                                 weights_name=vlm_weights_name or "the Motus checkpoint"),
                                   load_qwen3_vl_prompt(vlm))
    return FrozenEncoders(vae, text, features, text_len=text_len, image_size=image_size,
                          attend_padding=attend_padding)


# ---- what will run, from headers and configs only (motus-fast check) --------------------------------------------
def _stored(src) -> tuple[int, str]:
    keys = list(src.keys())
    dtypes = sorted({str(src.dtype(k)).removeprefix("torch.") for k in keys}) if hasattr(src, "dtype") else []
    return parameter_count(src.shape(k) for k in keys), "/".join(dtypes)


def _describe(path: Path, what: str, original_sizes, folder_of, prefer: str) -> dict:
    """{path, layout, params, stored dtype, sizes}: a release ``.pth`` (sizes read from its shapes by
    `original_sizes`) or a library folder (`folder_of` -> (folder, config))."""
    if is_torch_file(path):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found ({what})")
        with open_weights(path) as src:
            sizes = original_sizes(src, str(path))
            n, dt = _stored(src)
        return {"path": str(path), "layout": "original .pth", "params": n, "dtype": dt, **sizes}
    folder, cfg = folder_of(path)
    with open_weights(folder, prefer=(prefer,)) as src:
        n, dt = _stored(src)
    layout = "diffusers" if prefer == "diffusion_pytorch_model" else "transformers"
    return {"path": str(folder), "layout": layout, "params": n, "dtype": dt, **original_sizes(cfg, None)}


def describe_vae(path: Path) -> dict:
    """{path, layout, params, stored dtype, z_dim}; raises CheckpointError naming the problem."""
    def sizes(src, name):
        return {"z_dim": int(src["z_dim"] if name is None else original_vae_config(src, name)["z_dim"])}
    return _describe(resolve_vae_path(path), "the Wan2.2 VAE", sizes, vae_folder, "diffusion_pytorch_model")


def describe_umt5(path: Path) -> dict:
    """{path, layout, params, stored dtype, d_model}; raises CheckpointError naming the problem."""
    def sizes(src, name):
        return {"d_model": int(src["d_model"] if name is None else original_t5_config(src, name).d_model)}
    return _describe(resolve_umt5_path(path), "the umT5 encoder", sizes, umt5_folder, "model")


def describe_qwen3_vl(path: str | Path, with_weights: bool = True) -> dict:
    """The Qwen3-VL folder: config widths, tokenizer/processor/chat template presence, and its weights' headers
    unless the weights come from elsewhere (`with_weights` False)."""
    folder = qwen3_vl_folder(path)
    cfg = read_json(folder / "config.json")
    text = cfg.get("text_config", {})
    out = {"path": str(folder), "hidden_size": text.get("hidden_size"), "layers": text.get("num_hidden_layers"),
           "problems": []}
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        out["problems"].append(f"{folder}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    if not (folder / "preprocessor_config.json").is_file():
        out["problems"].append(f"{folder / 'preprocessor_config.json'}: not found (the Qwen3-VL image processor)")
    if with_weights:
        with open_weights(folder, prefer=("model",)) as src:
            out["params"], out["dtype"] = _stored(src)
    return out


def describe_encoders(wan: str | Path, vlm: str | Path | None, t5: str | Path | None = None, *,
                      dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32) -> dict:
    """What identifies a bundle ``load_encoders`` would build (for caches made with it): each component's files,
    layout, sizes and stored dtype, the run dtypes, and a hash of the VLM's chat template."""
    import hashlib

    files = wan_files(wan, t5)
    out = {"vae": describe_vae(files.vae), "umt5": describe_umt5(files.t5),
           "tokenizer": None if files.tokenizer is None else str(files.tokenizer.resolve()),
           "dtype": str(dtype).removeprefix("torch."), "vae_dtype": str(vae_dtype).removeprefix("torch.")}
    for part in ("vae", "umt5"):
        out[part]["path"] = str(Path(out[part]["path"]).resolve())
    if vlm is not None:
        d = describe_qwen3_vl(vlm)
        d.pop("problems")
        d["path"] = str(Path(d["path"]).resolve())
        folder = Path(d["path"])
        template = "".join((folder / f).read_text() for f in ("chat_template.jinja", "chat_template.json",
                                                              "tokenizer_config.json") if (folder / f).is_file())
        d["prompt_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
        out["vlm"] = d
    return out


def training_encoders(model_cfg, use_vlm: bool, *, wan: str | Path | None = None, vlm: str | Path | None = None,
                      t5: str | Path | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      device=None) -> tuple[FrozenEncoders, dict]:
    """The encoders a training run (or ``motus-fast encode``) uses, and their description for caches: the real ones
    from `wan`/`vlm` (per-sample preprocessing: no padding rows, batches pad and record lengths later), else tiny
    random ones (`seed`). Their output widths are checked against `model_cfg`, naming the field."""
    if wan is None:
        from motus_fast.encoders.tiny import build_tiny_encoders
        return (build_tiny_encoders(model_cfg, seed=seed, use_vlm=use_vlm),
                {"kind": "tiny", "seed": seed, "use_vlm": use_vlm})
    if use_vlm and vlm is None:
        raise CheckpointError("the und stream reads Qwen3-VL features: give the Qwen3-VL folder (--vlm), or train "
                              "stage 1")
    vlm = vlm if use_vlm else None
    desc = {"kind": "real", **describe_encoders(wan, vlm, t5, dtype=dtype)}
    enc = load_encoders(wan, vlm, t5=t5, dtype=dtype, device=device, progress=False)
    pairs = [("latent channels", enc.latent_channels, "video.in_channels", model_cfg.video.in_channels),
             ("umT5 width", enc.text_dim, "video.text_dim", model_cfg.video.text_dim)]
    if enc.vlm_dim is not None:
        pairs.append(("VLM hidden size", enc.vlm_dim, "und.vlm_dim", model_cfg.und.vlm_dim))
    for what, got, field, want in pairs:
        if got != want:
            raise CheckpointError(f"{wan} / {vlm}: the encoders' {what} is {got}, the model's {field} is {want}")
    return enc, desc
