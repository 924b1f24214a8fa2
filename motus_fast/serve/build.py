"""A served policy from typed settings: ``PolicySpec`` -> ``check_policy`` (what will run, from headers only) and
``build_policy`` (the model, the encoders, the engine, normalisation and the server config).

Called by `motus-fast serve` / `motus-fast check`, the Meta-World evaluation and the latency bench alike.

Checkpoints: ours (a directory) or an official one (converted on load). Encoders (``PolicySpec.encoders``):
- ``real``: the Wan2.2 VAE + umT5 from ``wan`` (original release or diffusers layout; ``t5`` overrides umT5) and
  Qwen3-VL from ``vlm``, whose weights come from the checkpoint when it carries them (``vlm_model.*`` in an
  official checkpoint, ``vlm.safetensors`` in ours), else from the folder;
- ``checkpoint``: stand-ins shipped in our checkpoint directory (the demo's patch-PCA VAE);
- ``stub``: deterministic stand-ins (not models);
- ``auto``: real when ``wan`` is given, else checkpoint when the directory ships encoders, else stub.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from motus_fast.serve.config import ServeConfig

log = logging.getLogger("motus_fast")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENCODERS = ("auto", "real", "checkpoint", "stub")
DEFAULT_IMAGE_SIZE = (64, 64)


@dataclass(frozen=True)
class PolicySpec:
    checkpoint: Optional[str] = None            # ours (directory) or official; None: a random `preset` model
    preset: Optional[str] = None                # testing only: a RANDOMLY INITIALISED model
    overrides: dict = field(default_factory=dict)   # config overrides for `preset`
    seed: int = 0                               # initialisation seed for `preset`
    upstream_config: Optional[str] = None       # upstream config JSON of an official checkpoint
    encoders: str = "auto"
    wan: Optional[str] = None                   # Wan2.2-TI2V-5B folder (either layout) or Wan2.2_VAE.pth
    vlm: Optional[str] = None                   # Qwen3-VL folder (config, tokenizer, processor, chat template)
    t5: Optional[str] = None                    # umT5 encoder instead of the one in `wan`
    attend_padding: Optional[bool] = None       # None: the checkpoint's hint, else True (upstream attends padding)
    device: Optional[str] = None                # default: cuda if available
    dtype: Optional[str] = None                 # fp32 | bf16 | fp16; default: bf16 on cuda, fp32 on cpu
    steps: Optional[int] = None
    shift: Optional[float] = None
    num_frames: Optional[int] = None            # default: the checkpoint's serving hints, else 2
    execute_steps: Optional[int] = None
    image_size: Optional[tuple[int, int]] = None  # default: the checkpoint's serving hints, else 64x64
    norm_mode: Optional[str] = None
    norm_dataset: Optional[str] = None
    cuda_graphs: Optional[bool] = None          # None: on where CUDA is
    threads: Optional[int] = None
    instruction_cache: int = 64
    sampler: str = "exact"                      # a named sampler preset (motus_fast.flow.get_sampler): exact | fast

    def __post_init__(self):
        if (self.checkpoint is None) == (self.preset is None):
            raise ValueError("give exactly one of checkpoint and preset")
        if self.encoders not in ENCODERS:
            raise ValueError(f"encoders must be one of {ENCODERS}, got {self.encoders!r}")
        if self.encoders == "real" and (self.wan is None or self.vlm is None):
            raise ValueError("real encoders need both wan (the Wan2.2 folder) and vlm (the Qwen3-VL folder)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def encoder_kind(self) -> str:
        if self.encoders != "auto":
            return self.encoders
        if self.wan is not None:
            return "real"
        return "checkpoint" if self.checkpoint and _shipped_encoders(self.checkpoint).is_file() else "stub"

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or ("bf16" if self.torch_device().type == "cuda" else "fp32")]


def _shipped_encoders(checkpoint: str) -> Path:
    from motus_fast.encoders import PatchPCAEncoders
    from motus_fast.weights.native import resolve_checkpoint
    return resolve_checkpoint(checkpoint) / PatchPCAEncoders.FILENAME


# ---- preflight --------------------------------------------------------------------------------------------------
@dataclass
class CheckReport:
    components: list[dict] = field(default_factory=list)   # each: name, path, layout, dtype, params, gpu_bytes
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = []
        for c in self.components:
            params = f"{c['params'] / 1e6:,.1f}M params" if c.get("params") is not None else "params ?"
            mem = f"{c['gpu_bytes'] / 2**30:.2f} GiB at {c['run_dtype']}" if c.get("gpu_bytes") is not None else ""
            lines.append(f"  {c['name']:<8} {c.get('layout', ''):<16} stored {c.get('dtype', '?'):<10} {params:<18} "
                         f"{mem:<22} {c.get('path', '')}")
            if c.get("weights_from"):
                lines.append(f"  {'':<8} weights from {c['weights_from']}")
        total = sum(c.get("gpu_bytes") or 0 for c in self.components)
        lines.append(f"  weights in GPU memory: {total / 2**30:.2f} GiB (activations and caches come on top)")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _motus_component(spec: PolicySpec) -> tuple[dict, "object"]:
    """The Motus checkpoint's description and its MotusConfig, from headers only."""
    from motus_fast.weights.native import is_checkpoint_dir, load_config, resolve_checkpoint
    from motus_fast.weights.sources import open_weights
    from motus_fast.weights.upstream import VLM_PREFIXES, header_config

    path = resolve_checkpoint(spec.checkpoint)
    if is_checkpoint_dir(path):
        cfg = load_config(path)
        with open_weights(path / "model.safetensors") as src:
            keys = src.keys()
            n = sum(_numel(src.shape(k)) for k in keys)
            dts = sorted({str(src.dtype(k)).removeprefix("torch.") for k in keys})
        vlm = path / "vlm.safetensors"
        return {"name": "motus", "path": str(path), "layout": "motus_fast", "params": n, "dtype": "/".join(dts),
                "vlm_weights": str(vlm) if vlm.is_file() else None}, cfg
    cfg, n, dts, n_vlm = header_config(path, spec.upstream_config)
    return {"name": "motus", "path": str(path), "layout": "official", "params": n, "dtype": dts,
            "vlm_weights": f"{path} ({n_vlm} tensors under {VLM_PREFIXES[0]}*)" if n_vlm else None}, cfg


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_policy(spec: PolicySpec) -> CheckReport:
    """Everything ``build_policy`` would load, read from file headers and configs only: each component, its
    layout, stored dtype, parameter count and weight memory at the run dtype, and every problem found (missing
    file, wrong layout, width mismatch between checkpoint and backbones, missing tokenizer), each naming the path."""
    from motus_fast.encoders.load import describe_qwen3_vl, describe_umt5, describe_vae, wan_files
    from motus_fast.weights.mapping import CheckpointError

    report = CheckReport()
    run = spec.torch_dtype()
    run_name = str(run).removeprefix("torch.")

    def add(comp: dict, dtype: torch.dtype = run) -> dict:
        comp["run_dtype"] = str(dtype).removeprefix("torch.")
        comp["gpu_bytes"] = None if comp.get("params") is None else comp["params"] * dtype.itemsize
        report.components.append(comp)
        return comp

    cfg = None
    if spec.checkpoint is not None:
        try:
            motus, cfg = _motus_component(spec)
            add(motus)
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            report.problems.append(f"Motus checkpoint: {e}")
    else:
        from motus_fast.config import get_preset
        cfg = get_preset(spec.preset).override(spec.overrides)
        add({"name": "motus", "path": f"random {spec.preset}", "layout": "preset", "params": None})
    if spec.encoder_kind != "real":
        add({"name": "encoders", "layout": spec.encoder_kind, "params": None,
             "path": str(_shipped_encoders(spec.checkpoint)) if spec.encoder_kind == "checkpoint" else "(stand-ins)"})
        if spec.encoder_kind == "checkpoint" and not _shipped_encoders(spec.checkpoint).is_file():
            report.problems.append(f"{_shipped_encoders(spec.checkpoint)}: not found (--encoders checkpoint)")
        return report

    try:
        files = wan_files(spec.wan, spec.t5)
    except (CheckpointError, OSError) as e:
        report.problems.append(str(e))
        files = None
    if files is not None:
        for name, describe, path, dtype in (("vae", describe_vae, files.vae, torch.float32),
                                            ("umt5", describe_umt5, files.t5, run)):
            try:
                comp = add({"name": name, **describe(path)}, dtype)
            except (CheckpointError, OSError, ValueError) as e:
                report.problems.append(str(e))
                continue
            if cfg is not None and name == "vae" and comp["z_dim"] != cfg.video.in_channels:
                report.problems.append(f"{comp['path']}: the VAE has {comp['z_dim']} latent channels (z_dim), the "
                                       f"checkpoint's video expert takes video.in_channels={cfg.video.in_channels}")
            if cfg is not None and name == "umt5" and comp["d_model"] != cfg.video.text_dim:
                report.problems.append(f"{comp['path']}: the umT5 width d_model={comp['d_model']} differs from the "
                                       f"checkpoint's video.text_dim={cfg.video.text_dim}")
        if files.tokenizer is None:
            report.problems.append(f"{spec.wan}: no umT5 tokenizer (looked beside {files.t5}: tokenizer/, "
                                   "google/umt5-xxl/)")
    vlm_weights = report.components[0].get("vlm_weights") if spec.checkpoint is not None and report.components else None
    try:
        comp = describe_qwen3_vl(spec.vlm, with_weights=vlm_weights is None)
        report.problems += comp.pop("problems")
        comp.update(name="vlm", layout="transformers")
        if vlm_weights is not None:
            params, stored = _vlm_params(spec.checkpoint, comp["path"], report)
            comp.update(weights_from=vlm_weights, params=params, dtype=stored)
        add(comp)
        if cfg is not None and comp["hidden_size"] != cfg.und.vlm_dim:
            report.problems.append(f"{comp['path']}/config.json: Qwen3-VL text_config.hidden_size="
                                   f"{comp['hidden_size']} differs from the checkpoint's und.vlm_dim={cfg.und.vlm_dim}")
    except (CheckpointError, OSError, ValueError) as e:
        report.problems.append(str(e))
    log.debug("check at run dtype %s: %d components, %d problems", run_name, len(report.components),
              len(report.problems))
    return report


def _vlm_params(checkpoint: str, folder: str, report: CheckReport) -> tuple[int, str]:
    """Parameters and stored dtypes of the checkpoint's VLM weights, checked against the Qwen3-VL folder's config
    (shapes only)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from motus_fast.weights.native import load_vlm_weights

    weights, where = load_vlm_weights(checkpoint)
    cfg = Qwen3VLConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    tied = set(model._tied_weights_keys) if cfg.get_text_config().tie_word_embeddings else set()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    have = {k: tuple(v.shape) for k, v in weights.items() if k not in tied}
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    misshaped = [f"{k}: checkpoint {list(have[k])}, config {list(expected[k])}" for k in sorted(set(have) & set(expected))
                 if have[k] != expected[k]]
    if missing or unexpected or misshaped:
        from motus_fast.weights.mapping import report as key_report
        report.problems.append(key_report(missing, unexpected, misshaped,
                                          f"{where}: the VLM weights do not match {folder}/config.json:"))
    dtypes = "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()}))
    return sum(_numel(s) for s in have.values()), dtypes


# ---- building ----------------------------------------------------------------------------------------------------
def build_policy(spec: PolicySpec, server: Optional[ServeConfig] = None):
    """-> (MotusPolicy, ServeConfig, a name for the log). `server`: network/limits settings (num_frames and
    execute_steps are filled in from `spec` and the checkpoint's serving hints). Problems that ``check_policy``
    finds are raised before anything heavy loads."""
    from motus_fast.infer import InferenceEngine
    from motus_fast.serve.normalization import Normalizer
    from motus_fast.serve.policy import MotusPolicy
    from motus_fast.weights.mapping import CheckpointError

    if spec.threads:
        torch.set_num_threads(spec.threads)
    kind = spec.encoder_kind
    if kind == "real":
        report = check_policy(spec)
        if not report.ok:
            raise CheckpointError("cannot serve:\n" + "\n".join(f"  - {p}" for p in report.problems))
    device, dtype = spec.torch_device(), spec.torch_dtype()
    model, extra, name = _load_model(spec, device, dtype)
    hints = extra.get("serve", {})       # written by trainers that know the data geometry (e.g. the demo)
    image_size = tuple(spec.image_size or hints.get("image_size", DEFAULT_IMAGE_SIZE))
    num_frames = spec.num_frames or hints.get("num_frames", 2)
    attend_padding = spec.attend_padding if spec.attend_padding is not None else hints.get("attend_padding", True)
    encoders = _build_encoders(spec, kind, model.cfg, image_size, device, dtype, attend_padding)
    from motus_fast.flow import get_sampler
    engine = InferenceEngine(model, encoders, steps=spec.steps, shift=spec.shift, cuda_graphs=spec.cuda_graphs,
                             instruction_cache=spec.instruction_cache, sampler=get_sampler(spec.sampler))
    config = dataclasses.replace(server or ServeConfig(), num_frames=num_frames, execute_steps=spec.execute_steps)
    normalizer = Normalizer.from_extra(extra, mode=spec.norm_mode, dataset=spec.norm_dataset)
    return MotusPolicy(engine, config, normalizer), config, name


def _load_model(spec: PolicySpec, device: torch.device, dtype: torch.dtype):
    if spec.checkpoint is not None:
        from motus_fast.weights.native import load_model
        model, extra = load_model(spec.checkpoint, dtype=dtype, device=device, upstream_config=spec.upstream_config)
        log.info("model: %s (%s on %s)", spec.checkpoint, str(dtype).removeprefix("torch."), device)
        return model, extra, str(spec.checkpoint)
    from motus_fast.config import get_preset
    from motus_fast.model import Motus
    torch.manual_seed(spec.seed)
    with torch.device(device):          # initialise where it runs (motus-8b in fp32 is 32 GB)
        model = Motus(get_preset(spec.preset).override(spec.overrides))
    log.warning("serving a RANDOMLY INITIALISED %s model (no checkpoint): its actions mean nothing", spec.preset)
    return model.to(dtype).eval(), {}, f"random {spec.preset}"


def _build_encoders(spec: PolicySpec, kind: str, cfg, image_size, device, dtype, attend_padding: bool):
    from motus_fast.encoders import PatchPCAEncoders, StubEncoders, load_encoders
    from motus_fast.weights.mapping import CheckpointError

    if kind == "real":
        from motus_fast.weights.native import load_vlm_weights
        vlm_weights, where = load_vlm_weights(spec.checkpoint) if spec.checkpoint else (None, "")
        if vlm_weights is None:
            log.warning("VLM weights: the checkpoint carries none; using the Qwen3-VL folder's own weights (%s)",
                        spec.vlm)
        return load_encoders(spec.wan, spec.vlm, t5=spec.t5, vlm_weights=vlm_weights, vlm_weights_name=where,
                             text_len=cfg.video.text_len, image_size=image_size, attend_padding=attend_padding,
                             dtype=dtype, device=device, progress=False)
    if kind == "checkpoint":
        shipped = _shipped_encoders(spec.checkpoint)
        if not shipped.is_file():
            raise CheckpointError(f"{shipped}: not found (--encoders checkpoint)")
        encoders = PatchPCAEncoders.load(cfg, shipped, device=device)
        if tuple(encoders.image_size) != tuple(image_size):
            raise CheckpointError(f"{shipped}: the checkpoint's encoders take {encoders.image_size} frames, not "
                                  f"{image_size}")
        log.warning("encoders: %s (patch-PCA VAE fitted to the training frames + stub prompt/VLM encoders; not "
                    "the real Wan VAE, umT5 or Qwen3-VL)", shipped)
        return encoders
    log.warning("encoders: stub (deterministic stand-ins for the VAE, umT5 and the VLM; not real models)")
    return StubEncoders(cfg, image_size, device=device)
