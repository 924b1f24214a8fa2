"""`motus-fast demo`: the whole system on a 2-core CPU, no GPU, no downloads, in about ten minutes.

1. **Data.** Meta-World's scripted experts solve reach, push and drawer-open; the episodes (64x64 frames, 21-D
   state, 4-D actions, an instruction each) are written as a LeRobot v3 dataset and read back through our loader
   (windows, mean/std normalisation from `motus-fast stats`-style statistics).
2. **Encoders.** No pretrained weights: the VAE stand-in is a patch-PCA autoencoder fitted to the demo's frames
   (`PatchPCAEncoders`, shipped inside the checkpoint), the prompt/VLM stand-ins are the deterministic stubs.
3. **Training.** A tiny-class Motus (stage 3: real actions, joint video + action loss) through the real trainer
   (FSDP2 on one process, checkpoints); and, as a baseline, the same network trained without the video stream
   (condition frame only, no video loss).
4. **Serving + closed loop.** `motus-fast serve` in a subprocess; held-out episodes run through the websocket
   client in `vla` mode with action chunking, next to the action-only baseline and a random policy.
5. **Imagination.** `world_model` mode on held-out episodes: predicted vs real future frames (PNG + GIF, PSNR).
6. **Report.** `report.md` + `report.png` (success rates, per-stage latency, training curves) in the run directory.

Every number in the report is measured by this run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("motus_fast")


@dataclass(frozen=True)
class DemoConfig:
    tasks: tuple[str, ...] = ("reach-v3", "push-v3", "drawer-open-v3")
    episodes_per_task: int = 30          # expert demonstrations per task
    image_size: int = 64
    condition_stride: int = 2            # a training window every 2 frames
    train_steps: int = 2500
    baseline_steps: int = 2500
    batch_size: int = 16
    lr: float = 2e-3
    eval_episodes: int = 20              # closed-loop episodes per task and policy
    eval_seed: int = 1000                # held out: demonstrations use seed 0
    max_steps: int = 150
    execute_steps: int = 8               # actions executed per chunk of 16
    sample_steps: int = 10
    imagination_episodes: int = 1        # held-out episodes per task for world_model mode
    seed: int = 0
    threads: int = 1                     # the tiny model's ops are too small to split: on 2 cores, 2 threads trained
                                         # at 4.7 steps/s, 1 thread at 8.4 (the server subprocess takes the other core)


QUICK = DemoConfig(tasks=("reach-v3",), episodes_per_task=20, train_steps=600, baseline_steps=300, lr=1e-3,
                   eval_episodes=10, imagination_episodes=1)


# ---- the pipeline ----------------------------------------------------------------------------------------------
def run_demo(out: str | Path = "runs/demo", cfg: DemoConfig = DemoConfig()) -> dict:
    """Run the demo into `out` and return the report dict (also written as report.json)."""
    from motus_fast.envs.metaworld import RenderSettings

    from motus_fast.experiments.toy import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(cfg.threads)      # at the start: the code that runs
    torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    render = RenderSettings(cfg.image_size, cfg.image_size)

    t = time.perf_counter()
    data_root, summary = _demonstrations(out, cfg, render)
    timings["data_s"] = time.perf_counter() - t
    _say(f"data: {summary['episodes']} expert episodes, {summary['frames']} frames -> {data_root} "
         f"({timings['data_s']:.0f} s)")

    t = time.perf_counter()
    model_cfg, encoders, windows, extra = _training_windows(data_root, cfg)
    timings["encode_s"] = time.perf_counter() - t
    _say(f"encode: {len(windows['full'])} training windows, patch-PCA VAE fitted ({timings['encode_s']:.0f} s)")

    ckpts, curves = {}, {}
    for name, steps in (("motus", cfg.train_steps), ("action_only", cfg.baseline_steps)):
        t = time.perf_counter()
        ckpts[name], curves[name] = _train(out / f"train_{name}", model_cfg, windows[name == "motus" and "full"
                                                                                     or "action_only"],
                                           steps, cfg, encoders, extra, video=name == "motus")
        timings[f"train_{name}_s"] = time.perf_counter() - t
        _say(f"train[{name}]: {steps} steps, loss {np.mean(curves[name]['loss'][:20]):.3f} -> "
             f"{np.mean(curves[name]['loss'][-20:]):.3f} ({timings[f'train_{name}_s']:.0f} s)")

    t = time.perf_counter()
    evals, latency = _closed_loop(ckpts, cfg, render)
    timings["eval_s"] = time.perf_counter() - t
    for name, r in evals.items():
        _say(f"eval[{name}]: " + ", ".join(f"{k} {v:.2f}" for k, v in r["success_rates"].items()))

    t = time.perf_counter()
    imagination = _imagine(out, ckpts["motus"], encoders, cfg, render)
    timings["imagination_s"] = time.perf_counter() - t
    _say(f"imagination: PSNR predicted {imagination['psnr_predicted']:.1f} dB vs copy-the-first-frame "
         f"{imagination['psnr_copy_first']:.1f} dB (VAE reconstruction ceiling {imagination['psnr_vae']:.1f} dB)")

    report = {"config": dataclasses.asdict(cfg), "data": summary, "timings_s": timings, "eval": evals,
              "server_latency_ms": latency, "training": {k: {"final_loss": float(np.mean(v["loss"][-20:]))}
                                                         for k, v in curves.items()},
              "imagination": imagination, "checkpoints": {k: str(v) for k, v in ckpts.items()}, "provenance": prov}
    _write_report(out, report, curves)
    _say(f"report: {out / 'report.md'} and {out / 'report.png'} "
         f"(total {sum(timings.values()) / 60:.1f} min)")
    return report


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _demonstrations(out: Path, cfg: DemoConfig, render):
    from motus_fast.experiments.toy import record_demonstrations

    root = out / "data" / "metaworld"
    return root, record_demonstrations(root, cfg.tasks, cfg.episodes_per_task, cfg.seed, render)


def _training_windows(data_root: Path, cfg: DemoConfig):
    """Read the LeRobot dataset back through our loader and encode every window once (the encoders are frozen)."""
    from motus_fast.data.norm import stats_to_json
    from motus_fast.encoders import PatchPCAEncoders
    from motus_fast.experiments.toy import encode_windows, read_windows, sample_clips, toy_model_config

    model_cfg = toy_model_config(cfg.sample_steps)
    samples, stats, data_cfg = read_windows(data_root, cfg.image_size, cfg.condition_stride)
    clips = sample_clips(samples)                                                        # N, 9, H, W, 3 uint8
    size = (cfg.image_size, cfg.image_size)
    encoders = PatchPCAEncoders.fit(model_cfg, clips.flatten(0, 1), size, seed=cfg.seed)
    encoded = encode_windows(samples, clips, encoders)
    windows = {"full": [w.full for w in encoded], "action_only": [w.cond for w in encoded]}
    extra = {"norm_stats": stats_to_json({"metaworld": stats}), "norm_mode": "mean_std",
             "serve": {"image_size": list(size), "num_frames": 3}, "data": data_cfg.to_dict(),
             "state_layout": "metaworld 21-D (goal in state)"}
    return model_cfg, encoders, windows, extra


def _train(run_dir: Path, model_cfg, windows, steps: int, cfg: DemoConfig, encoders, extra: dict, video: bool):
    from motus_fast.experiments.toy import train_run

    if not video:   # the baseline: condition frame only, nothing to predict, no video loss
        model_cfg = model_cfg.override({"flow.video_loss_weight": 0.0})
        extra = dict(extra, serve=dict(extra["serve"], num_frames=1))
    return train_run(run_dir, model_cfg, windows, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                     encoders=encoders, extra=extra)


def _closed_loop(ckpts: dict, cfg: DemoConfig, render):
    """The trained model through `motus-fast serve` (a subprocess) and the websocket client; the action-only
    baseline through the same server stack in this process; a random policy."""
    from motus_fast.eval.metaworld import RandomPolicy, ServedPolicy, checkpoint_policy, evaluate
    from motus_fast.serve.client import MotusClient

    kw = dict(tasks=cfg.tasks, episodes=cfg.eval_episodes, seed=cfg.eval_seed, max_steps=cfg.max_steps,
              execute_steps=cfg.execute_steps, render=render)
    results = {}
    with _server(ckpts["motus"], cfg) as port, MotusClient("127.0.0.1", port) as client:
        served = ServedPolicy(client, noise_seed=cfg.seed)
        results["motus"] = evaluate(served, **kw)
    baseline = checkpoint_policy(str(ckpts["action_only"]), image_size=render_size(render), noise_seed=cfg.seed)
    results["action_only"] = evaluate(baseline, **kw)
    results["random"] = evaluate(RandomPolicy(16, seed=cfg.seed), **kw)
    stages = sorted({k for t in served.server_timing for k in t})
    latency = {k: float(np.percentile([t[k] for t in served.server_timing if k in t], 50)) for k in stages}
    return {k: v.to_dict() for k, v in results.items()}, latency


def render_size(render) -> tuple[int, int]:
    return (render.height, render.width)


class _server:
    """`motus-fast serve --checkpoint ...` in a subprocess on a free port; yields the port."""

    def __init__(self, ckpt: Path, cfg: DemoConfig):
        self.cmd = [sys.executable, "-m", "motus_fast.cli", "serve", "--checkpoint", str(ckpt), "--port", "0",
                    "--threads", "1", "--execute-steps", str(cfg.execute_steps)]

    def __enter__(self) -> int:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            m = re.search(r"listening on ws://[\d.]+:(\d+)", line)
            if m:
                return int(m.group(1))
        raise RuntimeError("motus-fast serve exited before listening:\n" + "".join(lines[-20:]))

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _imagine(out: Path, ckpt: Path, encoders, cfg: DemoConfig, render) -> dict:
    """world_model mode on held-out expert episodes: given the real next 16 actions, predict the video."""
    from PIL import Image

    from motus_fast.data.norm import normalize, stats_from_json
    from motus_fast.envs.metaworld import generate_demonstrations
    from motus_fast.experiments.toy import latent_frame_target
    from motus_fast.experiments.toy import psnr as _psnr
    from motus_fast.flow import sample
    from motus_fast.weights.native import load_model
    from motus_fast.model import Conditioning

    model, extra = load_model(ckpt)
    stats = stats_from_json(extra["norm_stats"])["metaworld"]
    eps = list(generate_demonstrations(cfg.tasks, cfg.imagination_episodes, seed=cfg.eval_seed + 1000,
                                       render=render, progress=False))
    rows, psnr = [], {"predicted": [], "copy_first": [], "vae": []}
    g = torch.Generator().manual_seed(cfg.seed)
    for ep in eps:
        c = min(8, ep.length - 17)
        clip = torch.from_numpy(ep.frames[c: c + 17: 2].copy())[None]                     # 1, 9, H, W, 3
        actions = torch.from_numpy(normalize(ep.action[c: c + 16], stats.action, "mean_std"))[None].float()
        state = torch.from_numpy(normalize(ep.state[c], stats.state, "mean_std"))[None].float()
        latents = encoders.encode_frames(clip)
        text, _ = encoders.encode_prompts([ep.instruction])
        vlm, _ = encoders.vlm_features(clip[:, 0], [ep.instruction])
        res = sample(model, "world_model", cond=Conditioning(text, vlm, state), cond_latent=latents[:, :, :1],
                     num_frames=latents.shape[2], actions=actions, generator=g)
        predicted = encoders.decode_latents(res.video)[0]                                 # 9, H, W, 3
        vae = encoders.decode_latents(latents)[0]
        real = clip[0].float()
        future = slice(1, None)
        target = latent_frame_target(clip[0])
        psnr["predicted"].append(_psnr(predicted[future].float(), target[future]))
        psnr["copy_first"].append(_psnr(real[:1].expand_as(real[future]), target[future]))
        psnr["vae"].append(_psnr(vae[future].float(), target[future]))
        rows.append((clip[0].numpy(), predicted.numpy(), ep.task))
    grid = np.concatenate([np.concatenate([np.concatenate(list(r[0][::2]), 1), np.concatenate(list(r[1][::2]), 1)], 0)
                           for r in rows], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "imagination.png")
    frames = [Image.fromarray(np.concatenate([np.concatenate([r[0][i], r[1][i]], 1) for r in rows], 0))
              .resize((2 * cfg.image_size * 2, len(rows) * cfg.image_size * 2), Image.NEAREST) for i in range(9)]
    frames[0].save(out / "imagination.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    return {"episodes": [r[2] for r in rows], "psnr_predicted": float(np.mean(psnr["predicted"])),
            "psnr_copy_first": float(np.mean(psnr["copy_first"])), "psnr_vae": float(np.mean(psnr["vae"])),
            "png": str(out / "imagination.png"), "gif": str(out / "imagination.gif")}


def _write_report(out: Path, report: dict, curves: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2))
    ev, tasks = report["eval"], list(report["eval"]["motus"]["success_rates"])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.27
    for i, name in enumerate(ev):
        rates = [ev[name]["success_rates"][t] for t in tasks]
        bars = ax[0].bar(np.arange(len(tasks)) + (i - 1) * width, rates, width, label=name)
        ax[0].bar_label(bars, labels=[f"{r:.1f}" for r in rates], fontsize=8)
    ax[0].set_xticks(range(len(tasks)), tasks)
    ax[0].set_ylim(0, 1.05)
    ax[0].set_title(f"closed-loop success ({report['config']['eval_episodes']} held-out episodes per task)")
    ax[0].legend()
    lat = report["server_latency_ms"]
    ax[1].barh(list(lat), list(lat.values()))
    ax[1].set_title("server time per request, p50 (ms)")
    for name, c in curves.items():
        steps = np.arange(1, len(c["loss"]) + 1)
        ax[2].plot(steps, c["loss_action"], label=f"{name}: action loss")
        if name == "motus":
            ax[2].plot(steps, c["loss_video"], label=f"{name}: video loss")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("step")
    ax[2].set_title("training losses")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)

    p = report["provenance"]
    lines = ["# motus_fast CPU demo", "", "Every number below was measured by this run: commit "
             f"`{p['commit']}`{' (with uncommitted changes)' if p['dirty'] else ''}, {p['date']}, seed "
             f"{report['config']['seed']}, torch {p['torch']} ({p['torch_threads']} thread(s)), mujoco {p['mujoco']}, "
             f"metaworld {p['metaworld']}, numpy {p['numpy']}, python {p['python']}, {p['cpus']} CPUs.", "",
             "## Closed-loop success (Meta-World, held-out seeds)", "",
             "| task | " + " | ".join(ev) + " |", "|---|" + "---|" * len(ev)]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{ev[n]['per_task'][t]['successes']}/{ev[n]['per_task'][t]['episodes']}"
                                               for n in ev) + " |")
    lines += ["", "`motus`: served by `motus-fast serve` over the websocket client, `vla` mode, chunks of 16, "
              f"{report['config']['execute_steps']} executed. `action_only`: the same network trained without the "
              "video stream. `random`: uniform actions.", "",
              "## Server latency per stage (p50, ms)", "", "| stage | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["server_latency_ms"].items()]
    im = report["imagination"]
    lines += ["", "## World-model imagination (held-out episodes)", "",
              f"PSNR of the predicted future frames: **{im['psnr_predicted']:.1f} dB**; copying the first frame: "
              f"{im['psnr_copy_first']:.1f} dB; the patch-PCA VAE's own reconstruction (ceiling): "
              f"{im['psnr_vae']:.1f} dB. Rows: real, predicted. Files: `imagination.png`, `imagination.gif`.", "",
              "## Training", "", "| model | final loss |", "|---|---|"]
    lines += [f"| {k} | {v['final_loss']:.4f} |" for k, v in report["training"].items()]
    lines += ["", "## Time", "", "| phase | s |", "|---|---|"]
    lines += [f"| {k[:-2]} | {v:.0f} |" for k, v in report["timings_s"].items()]
    lines += ["", "Encoders: a patch-PCA autoencoder fitted to these frames stands in for the Wan2.2 VAE, and "
              "deterministic stubs for umT5 and Qwen3-VL (no downloads); see motus_fast/encoders/.",
              "", "![report](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


# ---- CLI ---------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("demo", help="the CPU demo: Meta-World data -> training -> serving -> closed loop -> "
                                    "imagination -> report (~10 min, no downloads)")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute version (reach only, fewer steps/episodes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a DemoConfig field, e.g. --set train_steps=2000")

    def run(args):
        from motus_fast.config import parse_overrides
        cfg = QUICK if args.quick else DemoConfig()
        over = parse_overrides(args.set)
        if "tasks" in over:
            over["tasks"] = tuple(over["tasks"])
        cfg = dataclasses.replace(cfg, **over)
        os.environ.setdefault("MUJOCO_GL", "egl")
        run_demo(args.out, cfg)

    p.set_defaults(func=run)
