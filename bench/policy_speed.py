"""Policy latency: what every sampler option costs and what it changes, measured on the same work.

    python -m bench.policy_speed                                   # demo-size model (random weights), CPU
    python -m bench.policy_speed --checkpoint runs/demo/train_motus/checkpoints/step_00000600
    python -m bench.policy_speed --checkpoint DIR --closed-loop-episodes 10     # + Meta-World success (slow)

For every option (``motus_fast.flow.SamplerOptions``; exact, the exact video/und cache on a model whose video/und
queries do not see actions, and each approximate shortcut):

- FLOPs per action chunk at the motus-8b inference shape (B = 1, 320x384 frames -> 3 latent frames of 20x24,
  360 video tokens; umT5 context 512 tokens; 150 und tokens; chunk 16; 10 steps), counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on the meta device: the per-request conditioning (text embedding,
  every layer's text K/V, und adapter, time MLPs of the step grid) plus each model call the sampler makes. Which
  calls an option makes (full steps, action-only steps, the video/und pass, the velocity cache's indicator) is
  counted on the small model's runs below (for the velocity cache it depends on the model's dynamics); the counts
  times the motus-8b cost of each call give the total, and a direct meta-device count of whole exact and cached
  `vla` samples checks the sum. The frozen encoders (VAE, umT5, VLM) are the same for every option and are left out.
  FP8 changes the arithmetic's precision, not its count (Hopper runs FP8 GEMMs at twice the bf16 peak).
- On the small model (a demo checkpoint, or the demo's architecture with random weights): cos and max |err| of
  the actions against the exact sampler on the same inputs and noise, and the wall time per chunk as a ratio to
  exact, all options measured round-robin in one run (CPU; FP8 is emulated on CPU, so its time says nothing).
- Optionally, closed-loop success on the demo's Meta-World tasks (needs --checkpoint).

Results: bench/results/policy_speed_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import write_results  # noqa: E402
from motus_fast.config import get_preset  # noqa: E402
from motus_fast.flow import SAMPLERS, SamplerOptions, sample, step_plan  # noqa: E402
from motus_fast.model import Conditioning, Motus  # noqa: E402
from motus_fast.model.fp8 import quantize_video_linears  # noqa: E402

# the motus-8b inference shape (module docstring)
MOTUS_8B_SHAPE = dict(latent=(3, 20, 24), text_tokens=512, und_tokens=150, steps=10)
CALLS = ("forward", "context_kv", "action_velocity", "first_layer_inputs")


@dataclass(frozen=True)
class Option:
    name: str
    mode: str
    options: SamplerOptions
    blind: bool = False         # run on the model whose video/und queries do not see actions


def options_to_measure() -> list[Option]:
    fast = SAMPLERS["fast"]
    rows = [Option("exact", "vla", SamplerOptions()),
            Option("exact video/und cache (video_und_see_actions=False model)", "vla", SamplerOptions(), blind=True),
            Option("uncached, same model (reference for the row above)", "vla",
                   SamplerOptions(context_cache=False), blind=True)]
    rows += [Option(f"(a) action-only suffix s={s}", "vla", SamplerOptions(action_only_after=s)) for s in (1, 2, 3, 5)]
    rows += [Option(f"(b) velocity cache thr={t}", "vla", SamplerOptions(velocity_threshold=t))
             for t in (0.1, 0.2, 0.5)]
    rows += [Option(f"(d) FP8 video weights, {g}-wise", "vla", SamplerOptions(fp8_video=g)) for g in ("tensor", "row")]
    rows += [Option("fast preset " + _describe(fast), "vla", fast)]
    rows += [Option("exact", "joint", SamplerOptions())]
    rows += [Option(f"(c) video_steps={n}", "joint", SamplerOptions(video_steps=n)) for n in (5, 2)]
    rows += [Option("(b) velocity cache thr=0.2", "joint", SamplerOptions(velocity_threshold=0.2))]
    return rows


def _describe(o: SamplerOptions) -> str:
    d = {k: v for k, v in asdict(o).items() if v != getattr(SamplerOptions(), k)}
    return "(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"


# ---- FLOPs at the motus-8b shape (meta device) ---------------------------------------------------------------
def dense_joint_attention(q, k, v, cu_seqlens, visible=None, max_seqlens=None, **_):
    """joint_attention for B = 1 without host reads (the reference reads cu_seqlens): each expert's queries attend
    to the concatenated keys of the experts it sees. Same FLOPs; runs on the meta device."""
    E = len(k)
    out = []
    for e in range(E):
        if q[e] is None:
            out.append(None)
            continue
        seen = [i for i in range(E) if visible is None or visible[e][i]]
        kk, vv = torch.cat([k[i] for i in seen]), torch.cat([v[i] for i in seen])
        out.append(F.scaled_dot_product_attention(q[e].transpose(0, 1), kk.transpose(0, 1),
                                                  vv.transpose(0, 1)).transpose(0, 1))
    return out


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Motus8bFlops:
    """FLOPs of each call the sampler makes, at the motus-8b inference shape, on the meta device."""

    def __init__(self, blind: bool):
        import motus_fast.model.mot as mot
        self._mot, self._attention = mot, mot.joint_attention
        cfg = get_preset("motus-8b").override({"video_und_see_actions": not blind})
        with torch.device("meta"):
            self.model = Motus(cfg).eval()
        T, H, W = MOTUS_8B_SHAPE["latent"]
        s = MOTUS_8B_SHAPE
        with torch.device("meta"):
            self.cond = Conditioning(text=torch.randn(1, s["text_tokens"], cfg.video.text_dim),
                                     vlm=torch.randn(1, s["und_tokens"], cfg.und.vlm_dim),
                                     state=torch.randn(1, cfg.action.state_dim))
            self.cond_latent = torch.randn(1, cfg.video.in_channels, 1, H, W)
            self.video = torch.randn(1, cfg.video.in_channels, T, H, W)
            self.actions = torch.randn(1, cfg.action.chunk_size, cfg.action.action_dim)

    def __enter__(self):
        self._mot.joint_attention = dense_joint_attention
        return self

    def __exit__(self, *exc):
        self._mot.joint_attention = self._attention

    @torch.no_grad()
    def per_call(self, mode: str) -> dict[str, int]:
        m, steps = self.model, MOTUS_8B_SHAPE["steps"]
        cache = m.cache_conditioning(self.cond)
        plan = step_plan(m, mode, 1, steps, 1.0, torch.float32, "meta")
        t = plan.t_video[0]
        out = {
            # per instruction and per step grid: the engine caches them across chunks
            "instruction": count_flops(lambda: m.cache_conditioning(Conditioning(text=self.cond.text))),
            "plan": count_flops(lambda: step_plan(m, mode, 1, steps, 1.0, torch.float32, "meta")),
            # per observation: the und adapter
            "observation": count_flops(lambda: m.und.embed(self.cond.vlm)),
            "forward": count_flops(lambda: m(self.video, t, self.actions, plan.t_action[0], self.cond, cache=cache,
                                             time_emb=plan.emb[0])),
            "context_kv": count_flops(lambda: m.context_kv(self.video, t, self.cond, cache, time_emb=plan.emb[0][0])),
            "first_layer_inputs": count_flops(lambda: m.first_layer_inputs(self.video, self.actions, self.cond,
                                                                           plan.emb[0])),
        }
        kv = m.context_kv(self.video, t, self.cond, cache, time_emb=plan.emb[0][0])
        out["action_velocity"] = count_flops(lambda: m.action_velocity(self.actions, plan.t_action[0], self.cond,
                                                                       cache, kv, time_emb=plan.emb[0][1]))
        return out

    @torch.no_grad()
    def whole_sample(self, mode: str, options: SamplerOptions) -> int:
        """A direct count of one whole ``flow.sample`` (options without host decisions)."""
        return count_flops(lambda: sample(self.model, mode, cond=self.cond, cond_latent=self.cond_latent,
                                          num_frames=self.video.shape[2], steps=MOTUS_8B_SHAPE["steps"],
                                          options=options, actions=self.actions if mode == "world_model" else None))


# ---- the small model on CPU --------------------------------------------------------------------------------------
def small_model(checkpoint: Optional[str], blind: bool, seed: int = 0):
    if checkpoint:
        from motus_fast.weights.native import load_model
        model, _ = load_model(checkpoint, dtype=torch.float32)
        if blind and model.cfg.video_und_see_actions:
            raise SystemExit(f"--blind-checkpoint {checkpoint}: its config has video_und_see_actions=True")
        return model
    # the demo's architecture (tiny preset sized for Meta-World), random weights with non-zero heads
    from motus_fast.demo import DemoConfig
    from motus_fast.experiments.toy import model_overrides
    cfg = get_preset("tiny").override(dict(model_overrides(DemoConfig().sample_steps), video_und_see_actions=not blind))
    torch.manual_seed(seed)
    model = Motus(cfg).eval()
    for head in (model.video.head, model.action.head):
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


def small_inputs(cfg, requests: int, image_hw=(64, 64), seed: int = 1):
    """Per request: conditioning, condition latent and noise (the same for every option)."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_hw[0] // 16, image_hw[1] // 16
    out = []
    for _ in range(requests):
        cond = Conditioning(text=torch.randn(1, 12, cfg.video.text_dim, generator=g),
                            vlm=torch.randn(1, 20, cfg.und.vlm_dim, generator=g),
                            state=torch.randn(1, cfg.action.state_dim, generator=g))
        out.append(dict(cond=cond, cond_latent=torch.randn(1, cfg.video.in_channels, 1, h, w, generator=g),
                        noise_video=torch.randn(1, cfg.video.in_channels, 3, h, w, generator=g),
                        noise_action=torch.randn(1, cfg.action.chunk_size, cfg.action.action_dim, generator=g)))
    return out


def demo_inputs(checkpoint: str, requests: int, seed: int = 1):
    """Real observations for a demo checkpoint: held-out scripted Meta-World episodes (seeds apart from training),
    one frame every few steps, through the checkpoint's encoders and state normalisation, as the server does."""
    from pathlib import Path

    from motus_fast.envs.metaworld import RenderSettings, generate_demonstrations
    from motus_fast.data.norm import normalize, stats_from_json
    from motus_fast.encoders import PatchPCAEncoders
    from motus_fast.weights.native import load_model

    model, extra = load_model(checkpoint, dtype=torch.float32)
    hw = tuple(extra.get("serve", {}).get("image_size", (64, 64)))
    encoders = PatchPCAEncoders.load(model.cfg, Path(checkpoint) / PatchPCAEncoders.FILENAME)
    stats = stats_from_json(extra["norm_stats"])["metaworld"]
    frames_per_episode = 4
    episodes = list(generate_demonstrations(("reach-v3",), max(1, math.ceil(requests / frames_per_episode)),
                                            seed=5000 + seed, render=RenderSettings(*hw), progress=False))
    g = torch.Generator().manual_seed(seed)
    out = []
    for ep in episodes:
        for t in torch.linspace(0, ep.length - 1, frames_per_episode).long().tolist():
            if len(out) == requests:
                break
            image = torch.from_numpy(ep.frames[t].copy())[None]
            text, _ = encoders.encode_prompts([ep.instruction])
            vlm, _ = encoders.vlm_features(image, [ep.instruction])
            state = torch.from_numpy(normalize(ep.state[t], stats.state, "mean_std"))[None].float()
            latent = encoders.encode_frames(image[:, None])
            C, h, w = latent.shape[1], latent.shape[-2], latent.shape[-1]
            out.append(dict(cond=Conditioning(text=text, vlm=vlm, state=state), cond_latent=latent,
                            noise_video=torch.randn(1, C, 3, h, w, generator=g),
                            noise_action=torch.randn(1, model.cfg.action.chunk_size, model.cfg.action.action_dim,
                                                     generator=g)))
    return out


class CallCounter:
    """Counts the model calls a sampler makes (patched on the instance, removed on exit)."""

    def __init__(self, model):
        self.model, self.counts = model, {n: 0 for n in CALLS}

    def __enter__(self):
        for n in CALLS:
            fn = getattr(self.model, n)

            def spy(*args, _fn=fn, _n=n, **kw):
                self.counts[_n] += 1
                return _fn(*args, **kw)
            setattr(self.model, n, spy)
        return self

    def __exit__(self, *exc):
        for n in CALLS:
            delattr(self.model, n)


def cos_and_err(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return (float(F.cosine_similarity(x.flatten().double(), ref.flatten().double(), dim=0)),
            float((x - ref).abs().max()))


def measure_small(rows: list[Option], checkpoint, blind_checkpoint, requests: int, steps: int, repeats: int):
    models = {False: small_model(checkpoint, False), True: small_model(blind_checkpoint, True)}
    fp8_models = {}
    for r in rows:
        if r.options.fp8_video and r.options.fp8_video not in fp8_models:
            fp8_models[r.options.fp8_video] = copy.deepcopy(models[False])
            quantize_video_linears(fp8_models[r.options.fp8_video], r.options.fp8_video)
    inputs = demo_inputs(checkpoint, requests) if checkpoint else small_inputs(models[False].cfg, requests)
    given = torch.randn(1, models[False].cfg.action.chunk_size, models[False].cfg.action.action_dim,
                        generator=torch.Generator().manual_seed(7))

    def run(r: Option, kw):
        model = fp8_models[r.options.fp8_video] if r.options.fp8_video else models[r.blind]
        extra = dict(actions=given) if r.mode == "world_model" else {}
        return sample(model, r.mode, steps=steps, options=r.options, **kw, **extra)

    results = {i: {"times": [], "outs": [], "calls": None} for i in range(len(rows))}
    for kw in inputs:
        for i, r in enumerate(rows):                 # calls: once per request
            model = fp8_models[r.options.fp8_video] if r.options.fp8_video else models[r.blind]
            with CallCounter(model) as c:
                out = run(r, kw)
            results[i]["outs"].append(out)
            calls = results[i]["calls"] or {n: 0 for n in CALLS}
            results[i]["calls"] = {n: calls[n] + c.counts[n] for n in CALLS}
    for _ in range(repeats):                         # times: round-robin over the options, same inputs
        for kw in inputs:
            for i, r in enumerate(rows):
                t0 = time.perf_counter()
                run(r, kw)
                results[i]["times"].append(time.perf_counter() - t0)
    return results


# ---- a demo model trained with the visibility (optional) ------------------------------------------------------------
def train_blind_demo_model(demo_out: str, quick: bool) -> str:
    """Train the demo's model once more on the demo's data (the same windows, steps and seed) with
    video_und_see_actions=False; -> its checkpoint directory. Uses the demo's own data and training steps."""
    from pathlib import Path

    from motus_fast import demo
    cfg = demo.QUICK if quick else demo.DemoConfig()
    torch.set_num_threads(cfg.threads)
    model_cfg, encoders, windows, extra = demo._training_windows(Path(demo_out) / "data" / "metaworld", cfg)
    model_cfg = model_cfg.override({"video_und_see_actions": False})
    ckpt, _ = demo._train(Path(demo_out) / "train_motus_blind", model_cfg, windows["full"], cfg.train_steps, cfg,
                          encoders, extra, video=True)
    return str(ckpt)


# ---- closed loop (optional) ----------------------------------------------------------------------------------------
def closed_loop(checkpoint: str, options: SamplerOptions, episodes: int, tasks, seed: int) -> dict:
    from motus_fast.eval.metaworld import checkpoint_policy, evaluate
    policy = checkpoint_policy(checkpoint, noise_seed=seed, threads=1)
    policy.server.policy.engine.set_sampler(options)
    res = evaluate(policy, tasks=tasks, episodes=episodes, seed=1000, execute_steps=8, progress=False)
    return {"success": res.mean_success_rate, "per_task": res.success_rates, "episodes": episodes * len(tasks)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a demo checkpoint (all-visible); default: random weights")
    p.add_argument("--blind-checkpoint", default=None, help="a checkpoint trained with video_und_see_actions=False")
    p.add_argument("--requests", type=int, default=4, help="inputs per option (accuracy and timing)")
    p.add_argument("--repeats", type=int, default=2, help="timing passes over the inputs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--closed-loop-episodes", type=int, default=0, help="Meta-World episodes per task and option "
                   "(needs --checkpoint; 0: skip)")
    p.add_argument("--closed-loop-tasks", nargs="+", default=["reach-v3"])
    p.add_argument("--closed-loop-options", nargs="+", default=None, help="option names to run closed loop "
                   "(default: all vla rows)")
    p.add_argument("--train-blind-from-demo", metavar="DEMO_OUT", default=None, help="first train the demo's model "
                   "with video_und_see_actions=False on the demo run's data (--quick: the quick demo's settings) "
                   "and use it as --blind-checkpoint")
    p.add_argument("--quick", action="store_true", help="with --train-blind-from-demo: the quick demo's settings")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.train_blind_from_demo:
        args.blind_checkpoint = train_blind_demo_model(args.train_blind_from_demo, args.quick)
        print(f"trained with video_und_see_actions=False: {args.blind_checkpoint}", flush=True)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOTUS_BACKEND", "reference")
    rows = options_to_measure()

    # FLOPs at motus-8b: per call, then per option from its calls on the small model
    per_call = {}
    for blind in (False, True):
        with Motus8bFlops(blind) as counter:
            for mode in sorted({r.mode for r in rows}):
                per_call[(blind, mode)] = counter.per_call(mode)
            if blind:
                direct_cached = counter.whole_sample("vla", SamplerOptions())
            else:
                direct_exact = counter.whole_sample("vla", SamplerOptions())
    small = measure_small(rows, args.checkpoint, args.blind_checkpoint, args.requests, args.steps, args.repeats)

    exact_idx = {r.mode: i for i, r in enumerate(rows) if r.name == "exact"}
    uncached_blind = next(i for i, r in enumerate(rows) if r.blind and not r.options.context_cache)
    table = []
    for i, r in enumerate(rows):
        calls = {n: c / args.requests for n, c in small[i]["calls"].items()}
        pc = per_call[(r.blind, r.mode)]
        flops = pc["observation"] + sum(calls[n] * pc[n] for n in CALLS)
        ref_i = uncached_blind if r.blind else exact_idx[r.mode]
        outs, refs = small[i]["outs"], small[ref_i]["outs"]
        cos = min(cos_and_err(o.actions, q.actions)[0] for o, q in zip(outs, refs))
        err = max(cos_and_err(o.actions, q.actions)[1] for o, q in zip(outs, refs))
        t = sorted(small[i]["times"])[len(small[i]["times"]) // 2]
        t_exact = sorted(small[exact_idx[r.mode]]["times"])[len(small[exact_idx[r.mode]]["times"]) // 2]
        table.append(dict(option=r.name, mode=r.mode, tflops_per_chunk=flops / 1e12,
                          calls=" ".join(f"{n}={calls[n]:g}" for n in CALLS if calls[n]),
                          cos_min=cos, one_minus_cos=1 - cos, max_abs_err=err, cpu_ms=t * 1e3, cpu_time_ratio=t / t_exact,
                          reference="uncached sampler, same model" if r.blind else "exact, same model",
                          options=asdict(r.options)))
    for row in table:
        base = next(x for x in table if x["mode"] == row["mode"] and x["option"] == "exact")
        row["flops_reduction"] = base["tflops_per_chunk"] / row["tflops_per_chunk"]

    # the direct whole-sample counts check the per-call sum
    exact_sum = next(x for x in table if x["option"] == "exact" and x["mode"] == "vla")["tflops_per_chunk"] * 1e12
    cached_sum = next(x for x, r in zip(table, rows) if r.blind and r.options.context_cache)["tflops_per_chunk"] * 1e12
    cached_per_request = {b: per_call[(b, "vla")]["instruction"] + per_call[(b, "vla")]["plan"] for b in (False, True)}
    for name, direct, summed in (("exact vla", direct_exact, exact_sum + cached_per_request[False]),
                                 ("cached vla", direct_cached, cached_sum + cached_per_request[True])):
        if not math.isclose(direct, summed, rel_tol=1e-6):
            raise SystemExit(f"{name}: per-call FLOPs sum {summed:.6g} != direct count {direct:.6g}")

    if args.closed_loop_episodes:
        if not args.checkpoint:
            raise SystemExit("--closed-loop-episodes needs --checkpoint (a trained demo checkpoint)")
        wanted = set(args.closed_loop_options or [r.name for r in rows if r.mode == "vla"])
        for row, r in zip(table, rows):
            if r.name not in wanted or r.mode != "vla" or (r.blind and (not args.blind_checkpoint
                                                                          or not r.options.context_cache)):
                continue        # (the uncached blind row equals the cached one bit for bit)
            ckpt = args.blind_checkpoint if r.blind else args.checkpoint
            cl = closed_loop(ckpt, r.options, args.closed_loop_episodes, args.closed_loop_tasks, 0)
            row["success"], row["closed_loop_episodes"] = cl["success"], cl["episodes"]
            print(f"closed loop {r.name}: {cl}", flush=True)

    model_desc = (f"checkpoint {args.checkpoint}" if args.checkpoint else
                  "the demo's architecture (tiny preset, Meta-World sizes) with RANDOM weights (heads N(0, 0.02))")
    blind_desc = (f"checkpoint {args.blind_checkpoint}" if args.blind_checkpoint else
                  "the same architecture with video_und_see_actions=False, random weights")
    instr = per_call[(False, "vla")]["instruction"] / 1e12
    notes = (f"FLOPs: motus-8b inference shape {MOTUS_8B_SHAPE}, B=1, meta-device FlopCounterMode. Per chunk = the "
             "und adapter (per observation) + the calls each option makes (counted on the small model, mean over "
             f"{args.requests} requests); the per-instruction text embedding and text K/V ({instr:.3f} TFLOP) and "
             "the time tables of the step grid are cached by the engine across chunks and left out. Direct counts of "
             f"whole flow.sample calls (which include them) agree: exact vla {direct_exact / 1e12:.3f} TFLOP, cached "
             f"vla {direct_cached / 1e12:.3f} TFLOP. Small model: {model_desc}; blind model: {blind_desc}. "
             f"{args.steps} steps, fp32, reference ops, {args.threads} thread(s); cos_min / max_abs_err of the "
             "actions over the requests vs the reference column; cpu_time_ratio = median time per chunk / exact's, "
             f"measured round-robin in this run ({args.repeats} passes). FP8 is emulated on CPU (its CPU time is "
             "not a speed measurement) and does not change the FLOP count.")
    cols = ["option", "mode", "tflops_per_chunk", "flops_reduction", "cos_min", "one_minus_cos", "max_abs_err", "cpu_time_ratio",
            "cpu_ms", "calls"] + (["success", "closed_loop_episodes"] if args.closed_loop_episodes else [])
    write_results("policy_speed", table, cols, notes=notes, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
