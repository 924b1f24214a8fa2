"""`motus-fast experiment ablations`: the paper's findings at toy scale on Meta-World (2-core CPU, no downloads).

Claims tested (paper numbers on its benchmark in brackets):

1. **The video stream matters most** [77.0% full vs 25.5% without it]: full Motus vs the same network trained
   without the video stream (condition frame only, no video loss: ``action_only``).
2. **Independent per-modality timesteps (UniDiffuser) beat one shared timestep** [77.0 vs 67.2]: full Motus vs the
   "joint diffuser" (``shared_timestep``: ``flow.timesteps="shared"``, so it can only sample `joint`, which is how
   it is evaluated).
3. **Latent actions let the action expert pretrain on unlabelled video**: action-free videos of *other* Meta-World
   tasks, labelled with latent actions by the optical-flow latent-action VAE (trained with 10% of its clips
   labelled, as the paper), stage 2 on them, then stage 3 on a few labelled demonstrations of the target tasks;
   against stage 3 alone on the same demonstrations; success against the number of demonstrations per task.

Also: full Motus with the understanding stream removed (``no_und``: ``und_stream=False``), and the five modes
measured on held-out episodes with the full model (world model / IDM / video / joint / VLA).

Every run is a job in a fresh process (``workers`` at a time); jobs write ``jobs/<name>/result.json`` and a rerun
skips finished jobs, so an interrupted experiment resumes. Each job's numbers depend only on the config and its
seeds, not on the schedule (single-threaded torch, seeded trainer draws, seeded sampler noise, seeded episodes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from motus_fast.envs.metaworld import DEMO_TASKS

log = logging.getLogger("motus_fast")

VARIANTS = ("motus", "action_only", "shared_timestep", "no_und")
# Other Meta-World tasks whose scripted experts make the action-free pretraining videos (actions discarded).
PRETRAIN_TASKS = ("drawer-close-v3", "button-press-topdown-v3", "button-press-v3", "door-open-v3",
                  "window-open-v3", "plate-slide-v3", "handle-press-v3", "coffee-button-v3", "faucet-open-v3",
                  "reach-wall-v3")


@dataclass(frozen=True)
class ExperimentConfig:
    tasks: tuple[str, ...] = DEMO_TASKS
    episodes_per_task: int = 30          # labelled demonstrations per target task (the ablations use them all)
    image_size: int = 64
    condition_stride: int = 2
    seeds: int = 3                       # training seeds per ablation variant
    variants: tuple[str, ...] = VARIANTS
    train_steps: int = 2000              # every training run (ablations, stage 2, stage 3 of the curve)
    batch_size: int = 16
    lr: float = 2e-3
    eval_episodes: int = 20              # held-out closed-loop episodes per task and trained model
    eval_seed: int = 1000
    max_steps: int = 150
    execute_steps: int = 8
    sample_steps: int = 10
    # latent-action pretraining
    pretrain_tasks: tuple[str, ...] = PRETRAIN_TASKS
    pretrain_episodes: int = 30          # action-free videos per pretraining task
    latent_steps: int = 1500             # latent-action VAE training steps
    labelled_fraction: float = 0.1       # share of the VAE's clips whose real actions are kept (paper: 10%)
    demo_counts: tuple[int, ...] = (2, 5, 10, 30)    # labelled demonstrations per target task, the curve's x
    curve_seeds: int = 1
    # the five modes, on held-out expert episodes
    modes_episodes: int = 3              # per task; three windows each
    workers: int = 2
    seed: int = 0

    def __post_init__(self):
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
        if "motus" not in self.variants:
            raise ValueError("the variants must include 'motus' (every claim compares against it)")
        if max(self.demo_counts) > self.episodes_per_task:
            raise ValueError(f"demo_counts {self.demo_counts} exceed episodes_per_task={self.episodes_per_task}")
        if self.seeds < 1 or self.curve_seeds < 1 or self.workers < 1:
            raise ValueError("seeds, curve_seeds and workers must be >= 1")


QUICK = ExperimentConfig(tasks=("reach-v3",), episodes_per_task=6, seeds=1, train_steps=60, eval_episodes=3,
                         pretrain_tasks=("drawer-close-v3", "button-press-v3"), pretrain_episodes=3, latent_steps=40,
                         demo_counts=(2, 6), modes_episodes=1)


# ---- the jobs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    name: str
    kind: str                            # "ablation" | "latent" | "curve" | "modes"
    variant: str = "motus"
    seed: int = 0
    demos: int = 0                       # curve: labelled demonstrations per task
    pretrained: bool = False             # curve: from the stage-2 checkpoint
    after: tuple[str, ...] = ()          # jobs whose results this one needs


def plan_jobs(cfg: ExperimentConfig) -> list[Job]:
    """Every job of the experiment, in the order they are started (the long chain first)."""
    jobs = [Job("latent", "latent")]
    jobs += [Job(f"ablation-motus-s{s}", "ablation", "motus", s) for s in range(cfg.seeds)]
    jobs += [Job(f"ablation-{v}-s{s}", "ablation", v, s) for s in range(cfg.seeds) for v in cfg.variants
             if v != "motus"]
    for s in range(cfg.curve_seeds):
        for n in cfg.demo_counts:
            if curve_job_name(cfg, n, "scratch", s).startswith("curve"):     # else the same run as an ablation
                jobs.append(Job(f"curve-n{n}-scratch-s{s}", "curve", seed=s, demos=n))
            jobs.append(Job(f"curve-n{n}-pretrained-s{s}", "curve", seed=s, demos=n, pretrained=True,
                            after=("latent",)))
    jobs.append(Job("modes", "modes", after=("ablation-motus-s0",)))
    return jobs


def curve_job_name(cfg: ExperimentConfig, n: int, tag: str, seed: int) -> str:
    """Stage 3 alone on every demonstration with seed s is exactly the ablation run ablation-motus-s<s> (same data
    in the same order, steps and seed): that run's result is used instead of training it again."""
    if tag == "scratch" and n == cfg.episodes_per_task and seed < cfg.seeds:
        return f"ablation-motus-s{seed}"
    return f"curve-n{n}-{tag}-s{seed}"


def run_experiment(out: str | Path, cfg: ExperimentConfig = ExperimentConfig(), progress: bool = True) -> dict:
    """Prepare the data, run every job (resuming finished ones), write the report; returns the report dict."""
    from motus_fast.experiments.toy import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prov = provenance(threads=1)    # at the start: the code that runs, whatever is committed meanwhile
    cfg_path = out / "config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != _jsonable(cfg):
        raise ValueError(f"{cfg_path}: this directory holds an experiment with another config; use a new --out "
                         "(finished jobs are reused only under the same config)")
    cfg_path.write_text(json.dumps(_jsonable(cfg), indent=2))
    run_path = out / "run.json"          # when the experiment first started (a resumed run keeps it)
    run = json.loads(run_path.read_text()) if run_path.is_file() else {"started_at": time.time()}
    if not (out / "prepared" / "done").is_file():
        prepare(out, cfg)
        run["prepare_s"] = time.perf_counter() - t0
    run_path.write_text(json.dumps(run))
    jobs = plan_jobs(cfg)
    results = _run_jobs(out, cfg, jobs, progress)
    # wall time from the first start to the last job's end (across resumptions, so it includes any pause)
    total = max(r["finished_at"] for r in results.values()) - run["started_at"]
    report = build_report(out, cfg, results, {"prepare_s": run.get("prepare_s"), "total_s": total,
                                              "this_invocation_s": time.perf_counter() - t0}, prov)
    write_report(out, report)
    _say(f"report: {out / 'report.md'} ({report['timings_s']['total_s'] / 60:.1f} min)")
    return report


def _say(msg: str) -> None:
    print(f"[experiment] {msg}", flush=True)


def _jsonable(cfg: ExperimentConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _run_jobs(out: Path, cfg: ExperimentConfig, jobs: list[Job], progress: bool) -> dict[str, dict]:
    """Run the jobs `cfg.workers` at a time, each in a fresh process, respecting `after`; skip finished ones."""
    import multiprocessing as mp

    results: dict[str, dict] = {}
    pending = []
    for job in jobs:
        path = out / "jobs" / job.name / "result.json"
        if path.is_file():
            results[job.name] = json.loads(path.read_text())
            results[job.name].setdefault("finished_at", path.stat().st_mtime)   # results written before it was kept
        else:
            pending.append(job)
    if results:
        _say(f"{len(results)} finished job(s) reused: {', '.join(sorted(results))}")
    running: dict = {}
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        while pending or running:
            for job in [j for j in pending if all(a in results for a in j.after)][: cfg.workers - len(running)]:
                pending.remove(job)
                running[pool.submit(run_job, str(out), cfg, job)] = (job, time.perf_counter())
                _say(f"start {job.name}")
            if not running:
                missing = sorted({a for j in pending for a in j.after} - set(results))
                raise RuntimeError(f"jobs {[j.name for j in pending]} wait for {missing}, which did not finish")
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job, t = running.pop(fut)
                results[job.name] = fut.result()       # a failed job raises here, naming itself in its traceback
                _say(f"done  {job.name} ({time.perf_counter() - t:.0f} s): {_brief(results[job.name])}")
    return results


def _brief(result: dict) -> str:
    if "eval" in result:
        return ", ".join(f"{t} {r['successes']}/{r['episodes']}" for t, r in result["eval"]["per_task"].items())
    return ", ".join(f"{k} {v:.3g}" for k, v in result.get("summary", {}).items())


def run_job(out: str, cfg: ExperimentConfig, job: Job) -> dict:
    """One job in this (fresh) process; writes and returns its result."""
    torch.set_num_threads(1)
    os.environ.setdefault("MUJOCO_GL", "egl")
    logging.basicConfig(level=logging.WARNING)
    d = Path(out) / "jobs" / job.name
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    fn = {"ablation": _ablation_job, "latent": _latent_job, "curve": _curve_job, "modes": _modes_job}[job.kind]
    result = fn(Path(out), cfg, job, d)
    result.update(job=dataclasses.asdict(job), wall_s=time.perf_counter() - t, finished_at=time.time())
    (d / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ---- data, once --------------------------------------------------------------------------------------------------
def prepare(out: Path, cfg: ExperimentConfig) -> None:
    """Demonstrations of the target tasks (LeRobot v3, read back through our loader), action-free videos of the
    pretraining tasks, the patch-PCA VAE fitted to both, every target window encoded."""
    from motus_fast.data.norm import stats_to_json
    from motus_fast.encoders import PatchPCAEncoders
    from motus_fast.envs.metaworld import RenderSettings, generate_demonstrations
    from motus_fast.experiments.toy import (encode_windows, read_windows, record_demonstrations, sample_clips,
                                            toy_model_config)

    prep = out / "prepared"
    prep.mkdir(parents=True, exist_ok=True)
    render = RenderSettings(cfg.image_size, cfg.image_size)
    t = time.perf_counter()
    summary = record_demonstrations(prep / "targets", cfg.tasks, cfg.episodes_per_task, cfg.seed, render)
    videos = list(generate_demonstrations(cfg.pretrain_tasks, cfg.pretrain_episodes, seed=cfg.seed + 7,
                                          render=render, only_successful=False))
    _say(f"data: {summary['episodes']} target demonstrations ({summary['frames']} frames), {len(videos)} "
         f"action-free pretraining videos of {len(cfg.pretrain_tasks)} other tasks ({time.perf_counter() - t:.0f} s)")
    samples, stats, data_cfg = read_windows(prep / "targets", cfg.image_size, cfg.condition_stride)
    clips = sample_clips(samples)
    model_cfg = toy_model_config(cfg.sample_steps)
    size = (cfg.image_size, cfg.image_size)
    frames = torch.cat([clips.flatten(0, 1)] + [torch.from_numpy(v.frames[::4]) for v in videos])
    encoders = PatchPCAEncoders.fit(model_cfg, frames, size, seed=cfg.seed)
    encoders.save(prep / PatchPCAEncoders.FILENAME)
    windows = encode_windows(samples, clips, encoders)
    torch.save({"windows": windows}, prep / "targets.pt")
    np.savez_compressed(prep / "pretrain_videos.npz",
                        **{f"frames_{i}": v.frames for i, v in enumerate(videos)},
                        **{f"action_{i}": v.action for i, v in enumerate(videos)},
                        instructions=np.array([v.instruction for v in videos]))
    extra = {"norm_stats": stats_to_json({"metaworld": stats}), "norm_mode": "mean_std",
             "serve": {"image_size": list(size), "num_frames": 3}, "data": data_cfg.to_dict(),
             "state_layout": "metaworld 21-D (goal in state)"}
    (prep / "extra.json").write_text(json.dumps(extra))
    (prep / "summary.json").write_text(json.dumps({"targets": summary, "pretrain_videos": len(videos),
                                                   "pretrain_frames": int(sum(v.length for v in videos)),
                                                   "windows": len(windows)}))
    (prep / "done").write_text("")
    _say(f"encode: {len(windows)} target windows; patch-PCA VAE fitted ({time.perf_counter() - t:.0f} s)")


def _prepared(out: Path, cfg: ExperimentConfig):
    from motus_fast.encoders import PatchPCAEncoders
    from motus_fast.experiments.toy import toy_model_config

    model_cfg = toy_model_config(cfg.sample_steps)
    prep = out / "prepared"
    encoders = PatchPCAEncoders.load(model_cfg, prep / PatchPCAEncoders.FILENAME)
    windows = torch.load(prep / "targets.pt", weights_only=False)["windows"]
    return model_cfg, encoders, windows, json.loads((prep / "extra.json").read_text())


def _first_episodes(windows, n: int) -> list:
    """The windows of the first n demonstrations of every task."""
    by_task: dict[str, list[int]] = {}
    for w in windows:
        eps = by_task.setdefault(w.instruction, [])
        if w.episode not in eps:
            eps.append(w.episode)
    keep = {e for eps in by_task.values() for e in sorted(eps)[:n]}
    return [w for w in windows if w.episode in keep]


# ---- ablations ---------------------------------------------------------------------------------------------------
def variant_config(model_cfg, variant: str):
    """The model config and serving mode of an ablation variant."""
    if variant == "action_only":
        return model_cfg.override({"flow.video_loss_weight": 0.0}), "vla"
    if variant == "shared_timestep":
        return model_cfg.override({"flow.timesteps": "shared"}), "joint"
    if variant == "no_und":
        return model_cfg.override({"und_stream": False}), "vla"
    return model_cfg, "vla"


def _train_and_evaluate(d: Path, cfg: ExperimentConfig, model_cfg, batches, extra, encoders, seed: int, mode: str,
                        stage: int = 3, init_from: Optional[str] = None) -> dict:
    from motus_fast.experiments.toy import train_run

    ckpt, curve = train_run(d / "train", model_cfg, batches, steps=cfg.train_steps, batch_size=cfg.batch_size,
                            lr=cfg.lr, seed=seed, encoders=encoders, extra=extra, stage=stage, init_from=init_from,
                            progress=False)
    return {"checkpoint": str(ckpt), "eval": _evaluate(ckpt, cfg, mode),
            "final_loss": {k: float(np.mean(v[-20:])) for k, v in curve.items()}, "curve": curve}


def _evaluate(ckpt: Path, cfg: ExperimentConfig, mode: str) -> dict:
    from motus_fast.envs.metaworld import RenderSettings
    from motus_fast.eval.metaworld import checkpoint_policy, evaluate

    policy = checkpoint_policy(str(ckpt), image_size=(cfg.image_size, cfg.image_size), noise_seed=cfg.seed,
                               threads=1, mode=mode)
    res = evaluate(policy, cfg.tasks, cfg.eval_episodes, cfg.eval_seed, max_steps=cfg.max_steps,
                   execute_steps=cfg.execute_steps, render=RenderSettings(cfg.image_size, cfg.image_size),
                   progress=False)
    d = res.to_dict()
    d.pop("episodes")
    return d


def _ablation_job(out: Path, cfg: ExperimentConfig, job: Job, d: Path) -> dict:
    model_cfg, encoders, windows, extra = _prepared(out, cfg)
    model_cfg, mode = variant_config(model_cfg, job.variant)
    if job.variant == "action_only":
        batches = [w.cond for w in windows]
        extra = dict(extra, serve=dict(extra["serve"], num_frames=1))
    else:
        batches = [w.full for w in windows]
    return dict(_train_and_evaluate(d, cfg, model_cfg, batches, extra, encoders, job.seed, mode), mode=mode,
                windows=len(batches))


# ---- latent actions: VAE, labels, stage 2 ------------------------------------------------------------------------
def _latent_job(out: Path, cfg: ExperimentConfig, job: Job, d: Path) -> dict:
    """Optical flow -> latent-action VAE (10% of its clips labelled) -> latent actions of every pretraining video
    (the real labeller, files on disk) -> stage 2 (pretrain layout) on those videos and latent actions."""
    from motus_fast.latent_action import get_preset as latent_preset
    from motus_fast.latent_action.data import build_flow_clips
    from motus_fast.latent_action.frames import EpisodeList
    from motus_fast.latent_action.label import label_latent_actions
    from motus_fast.latent_action.train import train_latent_actions

    model_cfg, encoders, _, extra = _prepared(out, cfg)
    z = np.load(out / "prepared" / "pretrain_videos.npz")
    n = len(z["instructions"])
    videos = [z[f"frames_{i}"] for i in range(n)]
    actions = [z[f"action_{i}"] for i in range(n)]
    instructions = [str(s) for s in z["instructions"]]
    la_cfg = latent_preset("tiny").override({"train.steps": cfg.latent_steps, "train.seed": cfg.seed,
                                             "train.labelled_fraction": cfg.labelled_fraction})
    s = la_cfg.frame_spacing
    # labels: the mean real action over each latent step's s raw steps, for 10% of the videos (every 10th)
    labelled = set(range(0, n, max(1, round(1 / cfg.labelled_fraction))))
    labels = {i: _step_actions(actions[i], s, len(videos[i])) for i in labelled}
    clips = build_flow_clips(EpisodeList(videos, fps=80.0, frame_step=s), la_cfg, labels, progress=False)
    vae, records = train_latent_actions(la_cfg, clips, d / "latent_vae", progress=False, echo=False)
    label_dir = label_latent_actions(vae, EpisodeList(videos, fps=80.0, frame_step=s), d / "labels",
                                     checkpoint=d / "latent_vae", checkpoint_step=cfg.latent_steps, overwrite=True,
                                     progress=False)
    meta = json.loads((label_dir / "meta.json").read_text())
    latents = [np.load(label_dir / meta["episodes"][str(i)]["file"]) for i in range(n)]
    probe = _linear_probe(latents, [_step_actions(a, s, len(v)) for a, v in zip(actions, videos)], labelled)

    # stage 2: windows of the action-free videos (condition frame + 8 frames at stride 2 = 16 raw frames) with the
    # 8 latent actions spanning the same raw frames, normalised by the labeller's statistics
    mean, std = np.asarray(meta["stats"]["mean"]), np.maximum(np.asarray(meta["stats"]["std"]), 1e-6)
    chunk = 16 // s
    batches = _stage2_batches(videos, latents, instructions, encoders, mean, std, chunk, cfg.condition_stride, s)
    s2_cfg = model_cfg.override({"action.action_dim": la_cfg.model.latent_dim, "action.chunk_size": chunk})
    from motus_fast.experiments.toy import train_run
    ckpt, curve = train_run(d / "stage2", s2_cfg, batches, steps=cfg.train_steps, batch_size=cfg.batch_size,
                            lr=cfg.lr, seed=cfg.seed, encoders=encoders, extra=extra, stage=2, progress=False)
    return {"stage2_checkpoint": str(ckpt), "stage2_windows": len(batches), "vae_clips": len(clips),
            "vae_labelled_clips": int(clips.labelled.sum()), "vae_final": records[-1] if records else {},
            "probe": probe, "stage2_final_loss": {k: float(np.mean(v[-20:])) for k, v in curve.items()},
            "stage2_curve": curve, "summary": {"probe_r2_unlabelled": probe["r2_unlabelled"],
                                               "stage2_loss": float(np.mean(curve["loss"][-20:]))}}


def _step_actions(action: np.ndarray, s: int, frames: int) -> np.ndarray:
    """[n_steps, 4]: the mean real action over the s raw steps of each latent step (frames k*s -> (k+1)*s)."""
    n = (len(range(0, frames, s)) - 1)
    return action[: n * s].reshape(n, s, action.shape[-1]).mean(1).astype(np.float32)


def _linear_probe(latents, actions, labelled: set) -> dict:
    """How much of the real action the latent actions carry: a least-squares linear map latent -> action fitted on
    the labelled videos, R^2 on the others (unlabelled for the VAE too)."""
    def stack(idx):
        return (np.concatenate([latents[i] for i in idx]), np.concatenate([actions[i] for i in idx]))
    train = sorted(labelled)
    test = [i for i in range(len(latents)) if i not in labelled]
    x, y = stack(train)
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    w, *_ = np.linalg.lstsq(xa, y, rcond=None)

    def r2(idx):
        if not idx:
            return float("nan")
        xt, yt = stack(idx)
        pred = np.concatenate([xt, np.ones((len(xt), 1))], 1) @ w
        return float(1 - np.sum((yt - pred) ** 2) / max(np.sum((yt - yt.mean(0)) ** 2), 1e-12))
    return {"r2_labelled": r2(train), "r2_unlabelled": r2(test), "train_steps": int(len(x))}


def _stage2_batches(videos, latents, instructions, encoders, mean, std, chunk: int, stride: int, s: int) -> list:
    from motus_fast.flow import FlowBatch
    from motus_fast.model import Conditioning

    prompts = sorted(set(instructions))
    text = dict(zip(prompts, encoders.encode_prompts(prompts)[0]))
    batches = []
    for v, lat, instr in zip(videos, latents, instructions):
        starts = [c for c in range(0, len(v) - 16, stride) if c % s == 0 and c // s + chunk <= len(lat)]
        if not starts:
            continue
        clips = torch.from_numpy(np.stack([v[c: c + 17: 2] for c in starts]))          # n, 9, H, W, 3
        video_lat = encoders.encode_frames(clips)
        vlm, _ = encoders.vlm_features(clips[:, 0], [instr] * len(starts))
        for j, c in enumerate(starts):
            acts = torch.from_numpy(((lat[c // s: c // s + chunk] - mean) / std).astype(np.float32))
            cond = Conditioning(text=text[instr][None], vlm=vlm[j: j + 1], state=None)
            batches.append(FlowBatch(video_lat[j: j + 1], acts[None], cond))
    return batches


def _curve_job(out: Path, cfg: ExperimentConfig, job: Job, d: Path) -> dict:
    """Stage 3 on the first `job.demos` demonstrations per task, from scratch or from the stage-2 checkpoint."""
    model_cfg, encoders, windows, extra = _prepared(out, cfg)
    chosen = _first_episodes(windows, job.demos)
    init = None
    if job.pretrained:
        init = json.loads((out / "jobs" / "latent" / "result.json").read_text())["stage2_checkpoint"]
    r = _train_and_evaluate(d, cfg, model_cfg, [w.full for w in chosen], extra, encoders, job.seed, "vla",
                            init_from=init)
    return dict(r, windows=len(chosen), init_from=init)


# ---- the five modes ----------------------------------------------------------------------------------------------
def _modes_job(out: Path, cfg: ExperimentConfig, job: Job, d: Path) -> dict:
    """The full model (ablation-motus-s0) in every mode on held-out expert episodes (windows at 3 start frames)."""
    from motus_fast.data.norm import normalize, stats_from_json
    from motus_fast.envs.metaworld import RenderSettings, generate_demonstrations
    from motus_fast.experiments.toy import latent_frame_target, psnr
    from motus_fast.flow import sample
    from motus_fast.model import Conditioning
    from motus_fast.weights.native import load_model

    _, encoders, _, _ = _prepared(out, cfg)
    ckpt = json.loads((out / "jobs" / "ablation-motus-s0" / "result.json").read_text())["checkpoint"]
    model, extra = load_model(ckpt)
    model.eval()
    stats = stats_from_json(extra["norm_stats"])["metaworld"]
    render = RenderSettings(cfg.image_size, cfg.image_size)
    eps = list(generate_demonstrations(cfg.tasks, cfg.modes_episodes, seed=cfg.eval_seed + 2000, render=render,
                                       progress=False))
    clips, actions, states, prompts = [], [], [], []
    for ep in eps:
        for c in np.linspace(0, ep.length - 17, 3).astype(int):
            clips.append(torch.from_numpy(ep.frames[c: c + 17: 2].copy()))
            actions.append(torch.from_numpy(normalize(ep.action[c: c + 16], stats.action, "mean_std")).float())
            states.append(torch.from_numpy(normalize(ep.state[c], stats.state, "mean_std")).float())
            prompts.append(ep.instruction)
    clips, actions, states = torch.stack(clips), torch.stack(actions), torch.stack(states)
    B = len(clips)
    with torch.no_grad():
        latents = encoders.encode_frames(clips)
        text, _ = encoders.encode_prompts(prompts)
        vlm, _ = encoders.vlm_features(clips[:, 0], prompts)
        cond = Conditioning(text, vlm, states)
        g = torch.Generator().manual_seed(cfg.seed)
        shuffled = actions[torch.roll(torch.arange(B), 1)]             # every window gets another window's actions
        kw = dict(cond=cond, cond_latent=latents[:, :, :1], num_frames=latents.shape[2], generator=g)
        res = {"world_model": sample(model, "world_model", actions=actions, **kw),
               "world_model_shuffled": sample(model, "world_model", actions=shuffled, **kw),
               "video": sample(model, "video", **kw),
               "joint": sample(model, "joint", **kw),
               "vla": sample(model, "vla", **kw),
               "idm": sample(model, "idm", video=latents, **kw)}
    target = torch.stack([latent_frame_target(c) for c in clips])[:, 1:]
    copy = clips[:, :1].float().expand_as(target)

    def video_psnr(r):
        pred = encoders.decode_latents(r.video)[:, 1:]
        return float(np.mean([psnr(pred[i], target[i]) for i in range(B)]))

    def action_mse(r):
        return float(torch.mean((r.actions - actions) ** 2))
    shuffle_mse = float(torch.mean((shuffled - actions) ** 2))
    metrics = {
        "windows": B,
        "psnr": {"world_model_true_actions": video_psnr(res["world_model"]),
                 "world_model_shuffled_actions": video_psnr(res["world_model_shuffled"]),
                 "video": video_psnr(res["video"]), "joint": video_psnr(res["joint"]),
                 "copy_first_frame": float(np.mean([psnr(copy[i], target[i]) for i in range(B)])),
                 "vae_reconstruction": float(np.mean([psnr(encoders.decode_latents(latents[i: i + 1])[0, 1:],
                                                           target[i]) for i in range(B)]))},
        "action_mse": {"idm_true_future": action_mse(res["idm"]), "vla_no_future": action_mse(res["vla"]),
                       "joint": action_mse(res["joint"]), "another_windows_actions": shuffle_mse},
    }
    metrics["summary"] = {"wm_psnr": metrics["psnr"]["world_model_true_actions"],
                          "idm_mse": metrics["action_mse"]["idm_true_future"]}
    return metrics


# ---- the report --------------------------------------------------------------------------------------------------
def _pooled(results: list[dict]) -> tuple[int, int]:
    k = sum(r["eval"]["per_task"][t]["successes"] for r in results for t in r["eval"]["per_task"])
    n = sum(r["eval"]["per_task"][t]["episodes"] for r in results for t in r["eval"]["per_task"])
    return k, n


def verdict(a: tuple[int, int], b: tuple[int, int]) -> str:
    """A claim "a beats b" on pooled success counts: supported when a's rate is higher and the two 95% Wilson
    intervals do not overlap; inconclusive when it is higher but they overlap; not supported otherwise."""
    from motus_fast.eval.metaworld import wilson_interval

    (ka, na), (kb, nb) = a, b
    ra, rb = ka / max(na, 1), kb / max(nb, 1)
    if ra <= rb:
        return "not supported"
    return "supported" if wilson_interval(ka, na)[0] > wilson_interval(kb, nb)[1] else "inconclusive"


def build_report(out: Path, cfg: ExperimentConfig, results: dict[str, dict], timings: dict, prov: dict) -> dict:
    from motus_fast.eval.metaworld import wilson_interval

    def ci(k, n):
        lo, hi = wilson_interval(k, n)
        return {"successes": k, "episodes": n, "rate": k / max(n, 1), "ci95": [lo, hi]}

    ablations = {}
    for v in cfg.variants:
        runs = [results[f"ablation-{v}-s{s}"] for s in range(cfg.seeds)]
        per_task = {t: ci(sum(r["eval"]["per_task"][t]["successes"] for r in runs),
                          sum(r["eval"]["per_task"][t]["episodes"] for r in runs)) for t in cfg.tasks}
        per_seed = [r["eval"]["mean_success_rate"] for r in runs]
        ablations[v] = {"per_task": per_task, "pooled": ci(*_pooled(runs)), "per_seed_mean": per_seed,
                        "mean_over_seeds": float(np.mean(per_seed)), "std_over_seeds": float(np.std(per_seed)),
                        "final_loss": [r["final_loss"] for r in runs], "mode": runs[0]["mode"]}
    curve = {}
    for n in cfg.demo_counts:
        for tag in ("scratch", "pretrained"):
            runs = [results[curve_job_name(cfg, n, tag, s)] for s in range(cfg.curve_seeds)]
            curve.setdefault(str(n), {})[tag] = dict(ci(*_pooled(runs)), windows=runs[0]["windows"])
    claims = []
    m = _pooled_of(results, "motus", cfg)
    if "action_only" in cfg.variants:
        a = _pooled_of(results, "action_only", cfg)
        claims.append(_claim("The video stream matters most (paper: 77.0% full vs 25.5% without it)",
                             "full Motus", m, "without the video stream", a))
    if "shared_timestep" in cfg.variants:
        sh = _pooled_of(results, "shared_timestep", cfg)
        claims.append(_claim("Independent per-modality timesteps beat one shared timestep (paper: 77.0 vs 67.2)",
                             "independent timesteps", m, "one shared timestep (joint sampling)", sh))
    few = [n for n in cfg.demo_counts if n < cfg.episodes_per_task] or list(cfg.demo_counts)
    pre = tuple(map(sum, zip(*[(curve[str(n)]["pretrained"]["successes"], curve[str(n)]["pretrained"]["episodes"])
                               for n in few])))
    scr = tuple(map(sum, zip(*[(curve[str(n)]["scratch"]["successes"], curve[str(n)]["scratch"]["episodes"])
                               for n in few])))
    claims.append(_claim("Latent-action pretraining on unlabelled video helps with few labelled demonstrations "
                         f"(pooled over {few} demos per task)", "stage 2 + stage 3", pre, "stage 3 alone", scr))
    if "no_und" in cfg.variants:
        nu = _pooled_of(results, "no_und", cfg)
        claims.append(_claim("The understanding stream helps (not a headline claim; its stand-in features are an "
                             "image colour grid + the instruction's bytes, and the text stream carries the "
                             "instruction too)", "full Motus", m, "without the und stream", nu))
    return {"config": _jsonable(cfg), "ablations": ablations, "curve": curve, "claims": claims,
            "latent": {k: v for k, v in results["latent"].items() if k not in ("stage2_curve",)},
            "modes": results["modes"], "timings_s": timings, "provenance": prov,
            "jobs": {k: {"wall_s": v["wall_s"]} for k, v in results.items()}}


def _pooled_of(results, variant, cfg) -> tuple[int, int]:
    return _pooled([results[f"ablation-{variant}-s{s}"] for s in range(cfg.seeds)])


def _claim(text, name_a, a, name_b, b) -> dict:
    from motus_fast.eval.metaworld import wilson_interval
    return {"claim": text, "verdict": verdict(a, b),
            "a": {"name": name_a, "successes": a[0], "episodes": a[1], "ci95": list(wilson_interval(*a))},
            "b": {"name": name_b, "successes": b[0], "episodes": b[1], "ci95": list(wilson_interval(*b))}}


def write_report(out: Path, report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2))
    cfg, ab, curve = report["config"], report["ablations"], report["curve"]
    tasks = cfg["tasks"]
    fig, ax = plt.subplots(1, 2, figsize=(14, 4.5))
    width = 0.8 / len(ab)
    for i, (v, r) in enumerate(ab.items()):
        cols = tasks + ["pooled"]
        rows = [r["per_task"][t] for t in tasks] + [r["pooled"]]
        x = np.arange(len(cols)) + (i - (len(ab) - 1) / 2) * width
        rate = np.array([q["rate"] for q in rows])
        # clipped: at k = n the interval's upper end can round a hair below the rate
        err = np.clip(np.array([[q["rate"] - q["ci95"][0], q["ci95"][1] - q["rate"]] for q in rows]).T, 0, None)
        ax[0].bar(x, rate, width, yerr=err, capsize=2, label=v)
    ax[0].set_xticks(range(len(tasks) + 1), tasks + ["pooled"])
    ax[0].set_ylim(0, 1.05)
    ax[0].set_title(f"closed-loop success, {cfg['seeds']} seeds x {cfg['eval_episodes']} episodes (95% Wilson)")
    ax[0].legend(fontsize=8)
    ns = [int(n) for n in curve]
    for tag in ("scratch", "pretrained"):
        rate = [curve[str(n)][tag]["rate"] for n in ns]
        lo = [curve[str(n)][tag]["ci95"][0] for n in ns]
        hi = [curve[str(n)][tag]["ci95"][1] for n in ns]
        ax[1].plot(ns, rate, "o-", label="stage 3 alone" if tag == "scratch" else "latent-action stage 2 + stage 3")
        ax[1].fill_between(ns, lo, hi, alpha=0.15)
    ax[1].set_xscale("log")
    ax[1].set_xticks(ns, [str(n) for n in ns])
    ax[1].set_xlabel("labelled demonstrations per task")
    ax[1].set_ylim(0, 1.05)
    ax[1].set_title("success vs labelled demonstrations")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
    (out / "report.md").write_text(report_markdown(report))


def _fmt(q: dict) -> str:
    return f"{q['successes']}/{q['episodes']} ({q['rate']:.2f} [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}])"


def report_markdown(report: dict) -> str:
    cfg, ab, curve, p = report["config"], report["ablations"], report["curve"], report["provenance"]
    tasks = cfg["tasks"]
    lines = ["# The paper's findings at toy scale (Meta-World, 2-core CPU)", "",
             f"Commit `{p['commit']}`{' (with uncommitted changes)' if p['dirty'] else ''}, {p['date']}; torch "
             f"{p['torch']}, mujoco {p['mujoco']}, metaworld {p['metaworld']}, numpy {p['numpy']}, python "
             f"{p['python']}, {p['cpus']} CPUs, {p['torch_threads']} torch thread(s) per job. "
             f"{report['timings_s']['total_s'] / 60:.1f} min from the first start to the last job's end "
             f"({len(report['jobs'])} jobs, {sum(j['wall_s'] for j in report['jobs'].values()) / 60:.0f} job-minutes "
             f"on {report['config']['workers']} workers). Every number below was measured by this run "
             "(the commit is the report's; a resumed run reuses finished jobs only under the same config).", "",
             "## Verdicts", ""]
    for c in report["claims"]:
        a, b = c["a"], c["b"]
        lines.append(f"- **{c['verdict']}** — {c['claim']}: {a['name']} {a['successes']}/{a['episodes']} "
                     f"[{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}] vs {b['name']} {b['successes']}/{b['episodes']} "
                     f"[{b['ci95'][0]:.2f}, {b['ci95'][1]:.2f}]")
    lines += ["", "Rule: supported when the first rate is higher and the 95% Wilson intervals of the pooled counts "
              "do not overlap; inconclusive when higher but overlapping; not supported otherwise.", "",
              f"## Ablations ({cfg['seeds']} training seeds x {cfg['eval_episodes']} held-out episodes per task, "
              f"{cfg['train_steps']} steps each)", "",
              "| variant | sampled as | " + " | ".join(tasks) + " | pooled | mean over seeds (std) |",
              "|---|---|" + "---|" * (len(tasks) + 2)]
    for v, r in ab.items():
        lines.append(f"| {v} | {r['mode']} | " + " | ".join(_fmt(r["per_task"][t]) for t in tasks) +
                     f" | {_fmt(r['pooled'])} | {r['mean_over_seeds']:.2f} ({r['std_over_seeds']:.2f}) |")
    lat = report["latent"]
    lines += ["", "`motus`: full model, independent timesteps, `vla` sampling. `action_only`: trained without the "
              "video stream (condition frame only, no video loss). `shared_timestep`: one timestep for video and "
              "actions in training (the joint diffuser), so sampled in `joint` mode. `no_und`: the understanding "
              "expert removed (`und_stream=False`).", "",
              "## Latent-action pretraining", "",
              f"Action-free videos: {cfg['pretrain_episodes']} per task of {len(cfg['pretrain_tasks'])} other tasks "
              f"({', '.join(cfg['pretrain_tasks'])}). Latent-action VAE (tiny preset, DIS optical flow, frame "
              f"spacing 2): {lat['vae_clips']} clips, {lat['vae_labelled_clips']} labelled "
              f"({cfg['labelled_fraction']:.0%} of the videos), {cfg['latent_steps']} steps. A linear probe "
              f"latent -> real action fitted on the labelled videos explains R^2 = "
              f"{lat['probe']['r2_unlabelled']:.2f} of the real actions of the unlabelled ones "
              f"({lat['probe']['r2_labelled']:.2f} on the labelled). Stage 2: {lat['stage2_windows']} windows, "
              f"final loss {lat['stage2_final_loss']['loss']:.3f}.", "",
              "| labelled demos per task | stage 3 alone | stage 2 (latent actions) + stage 3 |", "|---|---|---|"]
    for n, r in curve.items():
        lines.append(f"| {n} ({r['scratch']['windows']} windows) | {_fmt(r['scratch'])} | {_fmt(r['pretrained'])} |")
    m = report["modes"]
    ps, am = m["psnr"], m["action_mse"]
    lines += ["", f"## The five modes (full model, seed 0; {m['windows']} held-out windows)", "",
              "| mode | measured | value | reference |", "|---|---|---|---|",
              f"| world_model | PSNR of predicted frames given the true actions | {ps['world_model_true_actions']:.2f} dB | "
              f"given another window's actions {ps['world_model_shuffled_actions']:.2f} dB; copying the first "
              f"frame {ps['copy_first_frame']:.2f} dB; VAE ceiling {ps['vae_reconstruction']:.2f} dB |",
              f"| idm | action MSE given the true future frames | {am['idm_true_future']:.4f} | "
              f"vla without them {am['vla_no_future']:.4f}; another window's actions "
              f"{am['another_windows_actions']:.4f} |",
              f"| video | PSNR of generated frames | {ps['video']:.2f} dB | copying the first frame "
              f"{ps['copy_first_frame']:.2f} dB |",
              f"| joint | PSNR / action MSE | {ps['joint']:.2f} dB / {am['joint']:.4f} | - |",
              f"| vla | closed loop | {_fmt(ab['motus']['pooled'])} | see the ablations |", "",
              "Action MSE in normalised (mean/std) action units over the 16-step chunk.", "",
              "![report](report.png)", ""]
    return "\n".join(lines)


# ---- CLI ---------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("experiment", help="toy-scale experiments on Meta-World (the paper's findings)")
    esub = p.add_subparsers(dest="experiment", required=True)
    a = esub.add_parser("ablations", help="ablations, latent-action pretraining, the five modes -> report",
                        description=__doc__.split("\n")[0])
    a.add_argument("--out", default="runs/ablations", help="run directory (default: runs/ablations); a rerun "
                                                           "with the same config resumes")
    a.add_argument("--quick", action="store_true", help="a few-minute version (reach only, tiny budgets)")
    a.add_argument("--seeds", type=int, default=None, help="training seeds per ablation variant (default 3)")
    a.add_argument("--workers", type=int, default=None, help="jobs run at once (default 2)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an ExperimentConfig field, e.g. --set train_steps=1500")

    def run(args):
        from motus_fast.config import parse_overrides
        cfg = QUICK if args.quick else ExperimentConfig()
        over = parse_overrides(args.set)
        for k in ("tasks", "variants", "pretrain_tasks", "demo_counts"):
            if k in over:
                over[k] = tuple(over[k])
        if args.seeds is not None:
            over["seeds"] = args.seeds
        if args.workers is not None:
            over["workers"] = args.workers
        cfg = dataclasses.replace(cfg, **over)
        os.environ.setdefault("MUJOCO_GL", "egl")
        run_experiment(args.out, cfg)

    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit("run it as `motus-fast experiment ablations`")
