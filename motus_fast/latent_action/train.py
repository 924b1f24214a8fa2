"""Trainer for the latent-action VAE (single process; DESIGN.md section 7's conventions).

AdamW (betas 0.9/0.95, weight decay 0.01), gradient clipping at 0.5, linear warmup then cosine decay; a tqdm bar;
every ``log_every`` steps one JSON line (means over the window: loss, recon, kl, align, labelled, grad_norm, lr,
samples/s) appended to ``<out>/log.jsonl`` and printed; checkpoints (``checkpoint.py``) every ``save_every`` steps
and at the end. The DC-AE trains at its own ``dcae.lr`` when ``dcae.trainable``, else it is frozen.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from motus_fast.latent_action.checkpoint import save_latent_action_model
from motus_fast.latent_action.config import LatentActionConfig
from motus_fast.latent_action.data import FlowClips, MixedBatchSampler
from motus_fast.latent_action.model import LatentActionVAE, latent_action_loss

LOGGED = ("loss", "recon", "kl", "align", "labelled", "grad_norm")


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def train_latent_actions(cfg: LatentActionConfig, clips: FlowClips, out_dir: Optional[str | Path] = None,
                         model: Optional[LatentActionVAE] = None, progress: bool = True,
                         echo: bool = True) -> tuple[LatentActionVAE, list[dict]]:
    """Train (a fresh model unless `model` is given) on `clips`. Returns the model and the logged records."""
    from tqdm.auto import tqdm

    tc = cfg.train
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    if model is None:
        model = LatentActionVAE(cfg)
        model.fit_token_stats(clips.images)
    model.train()
    vae_params = [p for n, p in model.named_parameters() if not n.startswith("dcae.")]
    groups = [{"params": vae_params, "lr": tc.lr}]
    if cfg.dcae.trainable:
        groups.append({"params": list(model.dcae.parameters()), "lr": cfg.dcae.lr})
    params = [p for grp in groups for p in grp["params"]]
    opt = torch.optim.AdamW(groups, betas=tc.betas, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc.warmup_steps, tc.steps))
    sampler = MixedBatchSampler(clips.labelled, tc.batch_size, tc.labelled_fraction, g)
    has_labels = clips.actions.shape[1] > 0

    out = Path(out_dir) if out_dir is not None else None
    log_path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "log.jsonl"
    if echo:
        print(f"latent-action training: {len(clips)} clips ({int(clips.labelled.sum())} labelled), "
              f"{model.n_tokens} tokens x {model.width} from the DC-AE ({'trained' if cfg.dcae.trainable else 'frozen'}"
              f"), batch {tc.batch_size}, {tc.steps} steps, config {cfg.config_hash()}")

    records, window, t_window = [], [], time.perf_counter()
    bar = tqdm(range(tc.steps), desc="latent actions", unit="step", disable=not progress)
    for step in bar:
        idx = sampler.sample()
        images = clips.images[idx].float()
        out_vae = model(images, generator=g)
        losses = latent_action_loss(out_vae, images, clips.actions[idx] if has_labels else None,
                                    clips.labelled[idx], tc)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        lr = opt.param_groups[0]["lr"]          # the rate this step used
        opt.step()
        sched.step()
        window.append({**{k: v.item() for k, v in losses.items()}, "grad_norm": grad_norm.item(), "lr": lr})
        bar.set_postfix(loss=f"{window[-1]['loss']:.4f}", recon=f"{window[-1]['recon']:.4f}")
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            now = time.perf_counter()
            rec = {"step": step + 1, **{k: sum(w[k] for w in window) / len(window) for k in LOGGED},
                   "lr": window[-1]["lr"],
                   "samples_per_s": len(window) * tc.batch_size / max(now - t_window, 1e-9)}
            n_lab_steps = sum(1 for w in window if w["labelled"] > 0)   # align means only where it was measured
            rec["align"] = (sum(w["align"] for w in window if w["labelled"] > 0) / n_lab_steps) if n_lab_steps \
                else None
            records.append(rec)
            if log_path is not None:
                with log_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if echo:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            window, t_window = [], now
        if out is not None and tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.steps:
            save_latent_action_model(model, out, step=step + 1)
    if out is not None:
        save_latent_action_model(model, out, step=tc.steps)
    model.eval()
    return model, records
