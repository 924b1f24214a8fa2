"""Closed-loop evaluation on Meta-World, and `motus-fast eval metaworld`.

A policy is any callable ``policy(obs) -> actions``: ``obs`` is the dict of ``MetaWorldEnv.observe()`` (``image``
uint8 [H, W, 3], ``state`` float32 [21], ``instruction``, ``task``, ``env_obs`` float64 [39]) and ``actions`` an
action chunk [H, 4] (or one action [4]). The evaluator executes the first ``execute_steps`` actions of each chunk
(all of them when None), then asks again; an episode succeeds the first time Meta-World's ``info["success"]`` is
true, and ends there or after ``max_steps``. A policy with a ``reset()`` method is reset before every episode.

Plug in ``ServedPolicy(MotusClient(...))`` (the websocket client, in ``vla`` mode), ``checkpoint_policy(dir)`` (the
same server stack in this process), ``RandomPolicy`` (the floor), ``ScriptedPolicy`` (the ceiling: Meta-World's
hand-written experts) or an action-only baseline.

Evaluation episode i of a task starts from ``episode_seed(seed, task, i)``; use a base seed different from the
one the demonstrations were generated with (default 1000 here vs 0 there) to evaluate on held-out object and
goal positions.

    motus-fast eval metaworld --policy random --tasks reach-v3 push-v3 --episodes 10
    motus-fast eval metaworld --checkpoint runs/demo/checkpoint --episodes 10 --out eval.json
    motus-fast eval metaworld --server 127.0.0.1:8000 --episodes 10
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from motus_fast.envs.metaworld import (ACTION_DIM, DEMO_TASKS, MetaWorldEnv, RenderSettings, episode_seed,
                                       scripted_expert)

Policy = Callable[[dict], np.ndarray]


class EngineNotAvailable(RuntimeError):
    """The inference engine and policy server (motus_fast.infer, motus_fast.serve) that evaluating a checkpoint
    needs cannot be imported."""


class RandomPolicy:
    """Uniform random actions in [-1, 1]^4, ``chunk_size`` per call: the baseline a trained policy must beat."""

    def __init__(self, chunk_size: int = 16, seed: int = 0):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self._rng = np.random.default_rng(seed)

    def __call__(self, obs: dict) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, size=(self.chunk_size, ACTION_DIM)).astype(np.float32)


class ScriptedPolicy:
    """Meta-World's scripted expert of ``obs["task"]``, one action per call, read from ``obs["env_obs"]``."""

    def __init__(self):
        self._experts: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def __call__(self, obs: dict) -> np.ndarray:
        task = obs["task"]
        if task not in self._experts:
            self._experts[task] = scripted_expert(task)
        return self._experts[task](obs["env_obs"])[None]


class ServedPolicy:
    """Our observation dict -> a policy-server request (motus_fast.serve.schema.FIELDS: image, prompt, state, mode)
    -> the reply's action chunk. ``server``: anything with ``infer(request) -> {"actions", "server_timing"}`` -- our
    websocket ``MotusClient``, openpi's ``WebsocketClientPolicy``, or the in-process server of checkpoint_policy().
    Every reply's ``server_timing`` is kept (per-stage latency for the report). With ``noise_seed`` the i-th call
    of the run draws its noise from ``noise_seed + i`` (reproducible runs)."""

    def __init__(self, server, mode: str = "vla", steps: Optional[int] = None, noise_seed: Optional[int] = None):
        self.server, self.mode, self.steps, self.noise_seed = server, mode, steps, noise_seed
        self.server_timing: list[dict] = []

    def __call__(self, obs: dict) -> np.ndarray:
        request = {"image": obs["image"], "prompt": obs["instruction"], "state": obs["state"], "mode": self.mode}
        if self.steps is not None:
            request["steps"] = self.steps
        if self.noise_seed is not None:
            request["noise_seed"] = self.noise_seed + len(self.server_timing)
        reply = self.server.infer(request)
        self.server_timing.append(reply.get("server_timing", {}))
        return reply["actions"]

    def reset(self) -> None:
        reset = getattr(self.server, "reset", None)
        if callable(reset):
            reset()


class _InProcessServer:
    """MotusPolicy without the websocket: the server's validation and normalisation, called directly."""

    def __init__(self, policy):
        from motus_fast.serve.schema import validate

        self.policy, self._validate = policy, validate

    def infer(self, request: dict) -> dict:
        return self.policy.infer(self._validate(request, self.policy.spec))


def checkpoint_policy(checkpoint: str, *, image_size: tuple[int, int] = (64, 64), steps: Optional[int] = None,
                      noise_seed: Optional[int] = None, threads: Optional[int] = None,
                      mode: str = "vla") -> ServedPolicy:
    """Our checkpoint in ``mode`` (``vla``, or ``joint`` for a model trained with one shared timestep), in this
    process, built exactly as `motus-fast serve --checkpoint` builds it (engine, encoders, normalisation from the
    checkpoint's statistics)."""
    try:
        from motus_fast.serve.build import PolicySpec, build_policy
    except ImportError as e:
        raise EngineNotAvailable(
            f"evaluating --checkpoint {checkpoint} needs the inference engine and policy server "
            f"(motus_fast.infer, motus_fast.serve), which are not available ({e}); use --policy random or "
            "--policy scripted for a smoke run") from e
    policy, _, _ = build_policy(PolicySpec(checkpoint=str(checkpoint), image_size=tuple(image_size), threads=threads))
    return ServedPolicy(_InProcessServer(policy), mode=mode, steps=steps, noise_seed=noise_seed)


# ---- results -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpisodeResult:
    task: str
    index: int
    seed: int
    success: bool
    steps: int                          # environment steps taken (up to the first success)
    policy_calls: int
    frames: Optional[np.ndarray] = field(default=None, repr=False)   # uint8 [steps + 1, H, W, 3] when recorded


@dataclass(frozen=True)
class EvalResult:
    episodes: tuple[EpisodeResult, ...]
    policy_latency_s: tuple[float, ...]         # wall time of every policy call
    wall_s: float
    settings: dict

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(e.task for e in self.episodes))

    @property
    def success_rates(self) -> dict[str, float]:
        """Per-task success rate."""
        return {t: float(np.mean([e.success for e in self.episodes if e.task == t])) for t in self.tasks}

    @property
    def mean_success_rate(self) -> float:
        rates = self.success_rates
        return float(np.mean(list(rates.values()))) if rates else 0.0

    def latency_ms(self) -> dict[str, float]:
        lat = np.asarray(self.policy_latency_s) * 1e3
        if lat.size == 0:
            return {"mean": math.nan, "p50": math.nan, "p95": math.nan, "calls": 0}
        return {"mean": float(lat.mean()), "p50": float(np.percentile(lat, 50)),
                "p95": float(np.percentile(lat, 95)), "calls": int(lat.size)}

    def to_dict(self) -> dict:
        """JSON-ready (frames left out)."""
        per_task = {}
        for t in self.tasks:
            eps = [e for e in self.episodes if e.task == t]
            k = sum(e.success for e in eps)
            lo, hi = wilson_interval(k, len(eps))
            per_task[t] = {"success_rate": k / len(eps), "successes": k, "episodes": len(eps),
                           "ci95": [lo, hi], "mean_steps": float(np.mean([e.steps for e in eps]))}
        return {"success_rates": self.success_rates, "mean_success_rate": self.mean_success_rate,
                "per_task": per_task, "policy_latency_ms": self.latency_ms(), "wall_s": self.wall_s,
                "settings": self.settings,
                "episodes": [{"task": e.task, "index": e.index, "seed": e.seed, "success": e.success,
                              "steps": e.steps, "policy_calls": e.policy_calls} for e in self.episodes]}

    def summary(self) -> str:
        """A markdown table: success per task with its 95% Wilson interval, then the policy latency."""
        d = self.to_dict()
        lines = ["| task | success | rate | 95% CI | mean steps |", "|---|---|---|---|---|"]
        for t, r in d["per_task"].items():
            lines.append(f"| {t} | {r['successes']}/{r['episodes']} | {r['success_rate']:.2f} | "
                         f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['mean_steps']:.0f} |")
        lat = d["policy_latency_ms"]
        lines.append(f"\nmean success {d['mean_success_rate']:.2f}; policy latency mean {lat['mean']:.1f} ms, "
                     f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms over {lat['calls']} calls; "
                     f"{self.wall_s:.1f} s in all")
        return "\n".join(lines)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (honest at 0/n and n/n, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- the loop ----------------------------------------------------------------------------------------------------
def _as_chunk(actions, where: str) -> np.ndarray:
    try:
        chunk = np.asarray(actions, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: the policy must return an action chunk array [H, {ACTION_DIM}], got "
                        f"{type(actions).__name__} (a client's reply dict: return reply['actions'])") from e
    if chunk.ndim == 1:
        chunk = chunk[None]
    if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != ACTION_DIM:
        raise ValueError(f"{where}: the policy returned actions of shape {chunk.shape}, "
                         f"expected [H >= 1, {ACTION_DIM}]")
    if not np.all(np.isfinite(chunk)):
        raise ValueError(f"{where}: the policy returned non-finite actions")
    return chunk


def evaluate(policy: Policy, tasks: Sequence[str] = DEMO_TASKS, episodes: int = 10, seed: int = 1000, *,
             max_steps: int = 150, execute_steps: Optional[int] = None, render: RenderSettings = RenderSettings(),
             goal_in_state: bool = True, record_frames: bool = False, progress: bool = True) -> EvalResult:
    """Run ``episodes`` closed-loop episodes per task; see the module docstring. ``goal_in_state`` must match
    what the policy was trained with (see motus_fast.envs.metaworld). ``record_frames`` renders every step and
    keeps the frames in the EpisodeResults (for GIFs); otherwise only the frames the policy sees are rendered."""
    from tqdm.auto import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if execute_steps is not None and execute_steps < 1:
        raise ValueError(f"execute_steps must be >= 1 or None, got {execute_steps}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    results: list[EpisodeResult] = []
    latency: list[float] = []
    reset = getattr(policy, "reset", None)
    t_start = time.perf_counter()
    bar = tqdm(total=len(tasks) * episodes, desc="meta-world eval", unit="ep", disable=not progress)
    try:
        for task in tasks:
            with MetaWorldEnv(task, render, goal_in_state) as env:
                if not 1 <= max_steps <= env.max_path_length:
                    raise ValueError(f"max_steps must be in 1..{env.max_path_length}, got {max_steps}")
                for i in range(episodes):
                    s = episode_seed(seed, task, i)
                    if callable(reset):
                        reset()
                    env.reset(s)
                    frames = [env.render()] if record_frames else None
                    success, calls = False, 0
                    while env.steps < max_steps and not success:
                        obs = env.observe()
                        t = time.perf_counter()
                        actions = policy(obs)
                        latency.append(time.perf_counter() - t)
                        calls += 1
                        chunk = _as_chunk(actions, f"{task} episode {i} step {env.steps}")
                        n = len(chunk) if execute_steps is None else min(execute_steps, len(chunk))
                        for a in chunk[:n]:
                            success = env.step(a)
                            if frames is not None:
                                frames.append(env.render())
                            if success or env.steps >= max_steps:
                                break
                    results.append(EpisodeResult(task=task, index=i, seed=s, success=success, steps=env.steps,
                                                 policy_calls=calls,
                                                 frames=np.stack(frames) if frames is not None else None))
                    done = [r.success for r in results if r.task == task]
                    bar.set_postfix(task=task, success=f"{sum(done)}/{len(done)}")
                    bar.update(1)
    finally:
        bar.close()
    settings = {"tasks": tasks, "episodes": episodes, "seed": seed, "max_steps": max_steps,
                "execute_steps": execute_steps, "image_size": [render.height, render.width],
                "goal_in_state": goal_in_state}
    return EvalResult(episodes=tuple(results), policy_latency_s=tuple(latency), wall_s=time.perf_counter() - t_start,
                      settings=settings)


# ---- CLI ---------------------------------------------------------------------------------------------------------
def _cmd(args) -> None:
    image_size = args.image_size or 64
    client = None
    if args.checkpoint:
        try:
            policy = checkpoint_policy(args.checkpoint, image_size=(image_size, image_size), steps=args.sample_steps,
                                       noise_seed=args.seed, threads=args.threads)
        except EngineNotAvailable as e:
            raise SystemExit(f"error: {e}") from None
        name = f"checkpoint {args.checkpoint}"
    elif args.server:
        from motus_fast.serve.client import MotusClient

        host, _, port = args.server.rpartition(":")
        if not port.isdigit():
            raise SystemExit(f"error: --server expects HOST:PORT, got {args.server!r}")
        client = MotusClient(host or "127.0.0.1", int(port))
        served = client.metadata.get("image_shape", [image_size, image_size])[:2]
        if served[0] != served[1] or (args.image_size and args.image_size != served[0]):
            raise SystemExit(f"error: the server takes images of {served[0]}x{served[1]}; --image-size "
                             f"{args.image_size} renders {args.image_size}x{args.image_size}")
        image_size = served[0]
        policy, name = ServedPolicy(client, steps=args.sample_steps, noise_seed=args.seed), f"server {args.server}"
    elif args.policy == "random":
        policy, name = RandomPolicy(chunk_size=args.chunk_size, seed=args.seed), "random"
    else:
        policy, name = ScriptedPolicy(), "scripted expert"
    try:
        result = evaluate(policy, args.tasks, args.episodes, args.seed, max_steps=args.max_steps,
                          execute_steps=args.execute_steps, render=RenderSettings(image_size, image_size),
                          goal_in_state=not args.hide_goal)
    finally:
        if client is not None:
            client.close()
    print(f"policy: {name}")
    print(result.summary())
    if args.out:
        d = result.to_dict()
        d["policy"] = name
        if isinstance(policy, ServedPolicy):
            d["server_timing"] = policy.server_timing
        with open(args.out, "w") as f:
            json.dump(d, f, indent=2)
        print(f"wrote {args.out}")


def add_parser(benchmarks) -> None:
    p = benchmarks.add_parser("metaworld", help="closed-loop success rates on Meta-World tasks",
                              description=__doc__.split("\n")[0])
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--checkpoint", metavar="DIR", help="our checkpoint directory, run in vla mode in this process")
    who.add_argument("--server", metavar="HOST:PORT", help="a running `motus-fast serve` (vla mode, websocket)")
    who.add_argument("--policy", choices=["random", "scripted"], help="a baseline instead of a checkpoint")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), metavar="TASK")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=1000, help="base seed of the episodes (held out from the demos' 0)")
    p.add_argument("--max-steps", type=int, default=150, help="environment steps per episode")
    p.add_argument("--execute-steps", type=int, default=8,
                   help="actions executed from each chunk before the policy is asked again")
    p.add_argument("--chunk-size", type=int, default=16, help="actions per call of --policy random")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps (--checkpoint, --server)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square camera image size in pixels (default 64; --server: the server's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--checkpoint)")
    p.add_argument("--hide-goal", action="store_true",
                   help="zero the goal in the state (for policies trained with goal_in_state=False)")
    p.add_argument("--out", metavar="JSON", help="write the per-episode results here")
    p.set_defaults(func=_cmd)
