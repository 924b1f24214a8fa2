"""`motus-fast demo`: the whole model working on a CPU in about a minute.

Trains the tiny Motus for a few hundred steps on one fixed synthetic batch (the loss must fall), then samples in
all five modes and reports losses and timings. (The Meta-World closed-loop demo replaces this once the data,
training and serving stacks land.)
"""

from __future__ import annotations

import time

import torch


def run_demo(steps: int = 200, lr: float = 1e-3, seed: int = 0, preset: str = "tiny", sample_steps: int = 10,
             overrides: dict | None = None) -> dict:
    from tqdm.auto import tqdm

    from motus_fast.config import get_preset
    from motus_fast.data.synthetic import synthetic_batch
    from motus_fast.flow import MODES, FlowDraws, training_loss
    from motus_fast.model import Motus

    torch.manual_seed(seed)
    cfg = get_preset(preset).override(overrides or {})
    model = Motus(cfg)
    counts = model.param_counts()
    print(f"model '{preset}': " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    g = torch.Generator().manual_seed(seed)
    batch = synthetic_batch(cfg, batch=2, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step")
    for step in bar:
        draws = FlowDraws.sample(batch, cfg.flow, g)
        losses = training_loss(model, batch, draws)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    train_s = time.perf_counter() - t0
    first = sum(h["loss"] for h in history[:10]) / min(10, len(history))
    last = sum(h["loss"] for h in history[-10:]) / min(10, len(history))
    print(f"train: {steps} steps in {train_s:.1f}s ({1e3 * train_s / max(steps, 1):.0f} ms/step); "
          f"loss {first:.3f} (first 10) -> {last:.3f} (last 10)")

    model.eval()
    cond_latent = batch.video[:, :, :1]
    report = {"train_s": train_s, "loss_first": first, "loss_last": last, "modes": {}}
    for mode in MODES:
        t = time.perf_counter()
        out = model.sample(mode, cond_latent=cond_latent, cond=batch.cond, num_frames=batch.video.shape[2],
                           actions=batch.actions if mode == "world_model" else None,
                           video=batch.video if mode == "idm" else None, steps=sample_steps, generator=g,
                           progress=True)
        dt = time.perf_counter() - t
        parts = []
        if out.video is not None:
            parts.append(f"video mse {torch.mean((out.video - batch.video) ** 2).item():.3f}")
        if out.actions is not None:
            parts.append(f"action mse {torch.mean((out.actions - batch.actions) ** 2).item():.3f}")
        print(f"sample[{mode:>11}]: {sample_steps} steps in {dt * 1e3:.0f} ms; " + ", ".join(parts))
        report["modes"][mode] = dt
    return report


def register(sub) -> None:
    p = sub.add_parser("demo", help="train the tiny model briefly and sample in all five modes (CPU, ~1 min)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=10)
    p.set_defaults(func=lambda a: run_demo(steps=a.steps, lr=a.lr, seed=a.seed, sample_steps=a.sample_steps))
