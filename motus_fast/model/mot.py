"""Motus: a Mixture-of-Transformers of a video, an action and an understanding expert sharing one joint
self-attention per layer.

``MotusBlock`` is layer l of all three experts: each expert makes its q/k/v, ``joint_attention`` mixes them per
sample over [video | action | und], and each expert finishes its layer. Between layers each stream travels as a
``Stream`` whose FFN branch the next layer's AdaLN (or the output head's) adds in the same fused pass.
``Motus.forward`` predicts the video and action velocities for given noisy latents and per-modality timesteps;
``motus_fast.flow`` turns that into the training loss and the five sampling modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from motus_fast.config import MotusConfig
from motus_fast.model.action import ActionExpert, ActionLayer
from motus_fast.model.layers import Stream
from motus_fast.model.rope import rope_tables
from motus_fast.model.und import UndExpert, UndLayer
from motus_fast.model.wan import VideoExpert, VideoLayer
from motus_fast.ops import joint_attention, qk_norm_rope
from motus_fast.ops.profiling import annotate

Tensor = torch.Tensor


@dataclass
class Conditioning:
    """What a sample is conditioned on besides the streams being denoised.

    text: umT5 states [B, L_t, text_dim]; vlm: VLM last hidden states [B, L_u, vlm_dim] (None: no und stream); state: robot state
    [B, state_dim] (finetune layout) or None (pretrain layout). The optional lengths exclude padding rows from
    attention; without them every row is attended, as upstream does.
    """

    text: Tensor
    vlm: Optional[Tensor] = None
    state: Optional[Tensor] = None
    text_lens: Optional[Tensor] = None
    vlm_lens: Optional[Tensor] = None

    def to(self, *args, **kwargs) -> "Conditioning":
        def mv(t):
            return None if t is None else t.to(*args, **kwargs) if t.is_floating_point() else t
        return Conditioning(mv(self.text), mv(self.vlm), mv(self.state), self.text_lens, self.vlm_lens)


@dataclass
class ConditionCache:
    """What depends only on the conditioning, computed once per request and reused by every denoising step: the
    embedded text context, optionally every layer's cross-attention (k, v) of it, and the packed und tokens after
    the VLM adapter. (Under FSDP the per-layer K/V must be computed inside each block: leave text_kv None.)"""

    text_ctx: Tensor                        # [B, L_t, Dv]
    text_kv: Optional[list]                 # per layer (k, v) [B, L_t, H, D], or None
    und: Optional[tuple[Tensor, Tensor]]    # (tokens [T_u, Du], cu_seqlens [B+1]) or None (no und stream)


@dataclass
class LayerKV:
    """One layer's video and und keys (normalised, rotated) and values, [T, H, D] with samples concatenated: what
    the action expert's queries read in a step that does not recompute those streams."""

    video: tuple[Tensor, Tensor]
    und: Optional[tuple[Tensor, Tensor]]    # None: no und stream


def uniform_cu_seqlens(batch: int, length: int, device) -> Tensor:
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * length


def blind_to_actions(has_und: bool) -> list[list[bool]]:
    """Expert visibility over [video, action(, und)] where video and und queries do not attend to action keys."""
    if not has_und:
        return [[True, False], [True, True]]
    return [[True, False, True], [True, True, True], [True, False, True]]


class MotusBlock(nn.Module):
    def __init__(self, cfg: MotusConfig):
        super().__init__()
        self.video = VideoLayer(cfg.video)
        self.action = ActionLayer(cfg.action, cfg.num_heads, cfg.head_dim)
        self.und = UndLayer(cfg.und, cfg.num_heads, cfg.head_dim)

    @annotate("MotusBlock")   # an NVTX range per layer when MOTUS_NVTX=1 (motus_fast/ops/profiling.py)
    def forward(self, x: Stream, a: Optional[Stream], u: Optional[Stream], *, e6_video, e6_action, rope, text,
                text_lens, cu_video, cu_action, cu_und, last: bool, video_und_see_actions: bool = True,
                kv_out: Optional[list] = None):
        # x: [B, L_v, Dv]  a: [B, L_a, Da] or None  u: [T_u, Du] (packed) or None, each a Stream (the previous
        # layer's FFN branch still to add)  e6_*: [B, 6, D] or [B, L_v, 6, Dv]  cu_*: int32 [B+1] boundaries
        # text: embedded context [B, L_t, Dv] or this layer's cached (k, v). A stream given as None is absent
        # (stage 1 trains the video expert alone). Returns the three output Streams (und: None in the last layer);
        # while gradients are recorded they are settled: under activation checkpointing a block's inputs live until
        # the backward (a pending branch would be one more stream-sized tensor per layer), and a training step is
        # not bound by launches.
        B, L_v = x.x.shape[:2]
        rows = lambda t: None if t is None else t.reshape(-1, *t.shape[-2:])  # noqa: E731  [.., H, D] -> [T, H, D]
        x, qk_v, vv, mod_v = self.video.attention_inputs(x, e6_video, rope)
        qk, v = [qk_v], [rows(vv)]
        cu = [cu_video]
        if a is not None:
            a, qk_a, va, mod_a = self.action.attention_inputs(a, e6_action)
            qk, v = qk + [qk_a], v + [rows(va)]
            cu.append(cu_action)
        if u is not None:
            u, qk_u, vu = self.und.attention_inputs(u, need_queries=not last)
            qk, v = qk + [qk_u], v + [vu]
            cu.append(cu_und)
        normed = qk_norm_rope(qk, self.video.cfg.num_heads)                 # RMSNorm (+ RoPE), all experts at once
        if kv_out is not None:      # kept for later steps that run the action expert alone
            kv_out.append(LayerKV(video=(rows(normed[0][1]), v[0]),
                                  und=None if u is None else (rows(normed[-1][1]), v[-1])))
        # per-expert bounds of the sample lengths size the kernel grid without a device sync (und: its packed total)
        bounds = [L_v] + ([a.shape[1]] if a is not None else []) + ([u.shape[0]] if u is not None else [])
        visible = None if video_und_see_actions or a is None else blind_to_actions(u is not None)
        out = joint_attention([rows(q) for q, _ in normed], [rows(k) for _, k in normed], v, cu, visible=visible,
                              max_seqlens=bounds)
        x = self.video.finish(x, out[0].reshape(B, L_v, -1), mod_v, text, text_lens)
        if a is not None:
            a = self.action.finish(a, out[1].reshape(B, a.shape[1], -1), mod_a)
        if u is not None:
            u = None if last else self.und.finish(u, out[-1].flatten(1))
        if torch.is_grad_enabled():
            x, a, u = (None if s is None else s.settled() for s in (x, a, u))
        return x, a, u

    def context_kv(self, x: Stream, u: Optional[Stream], *, e6_video, rope) -> LayerKV:
        """The video and und keys and values alone (what a last layer contributes when only they are needed)."""
        rows = lambda t: None if t is None else t.reshape(-1, *t.shape[-2:])  # noqa: E731
        _, qk_v, vv, _ = self.video.attention_inputs(x, e6_video, rope)
        qk, v = [qk_v], [rows(vv)]
        if u is not None:
            _, qk_u, vu = self.und.attention_inputs(u, need_queries=False)
            qk, v = qk + [qk_u], v + [vu]
        normed = qk_norm_rope(qk, self.video.cfg.num_heads)
        return LayerKV(video=(rows(normed[0][1]), v[0]), und=None if u is None else (rows(normed[-1][1]), v[-1]))

    def action_only(self, a: Stream, kv: LayerKV, *, e6_action, cu_video, cu_action, cu_und) -> Stream:
        """This layer of the action expert alone, its queries attending to the given video/und keys and values and
        to its own. a: [B, L_a, Da] -> [B, L_a, Da], as Streams"""
        B, L_a = a.x.shape[:2]
        a, qk_a, va, mod_a = self.action.attention_inputs(a, e6_action)
        (q, k), = qk_norm_rope([qk_a], self.video.cfg.num_heads)
        rows = lambda t: t.reshape(B * L_a, *t.shape[-2:])  # noqa: E731
        queries, keys, values = [None, rows(q)], [kv.video[0], rows(k)], [kv.video[1], rows(va)]
        cu = [cu_video, cu_action]
        bounds = [kv.video[0].shape[0] // B, L_a]
        if kv.und is not None:
            queries, keys, values, cu = queries + [None], keys + [kv.und[0]], values + [kv.und[1]], cu + [cu_und]
            bounds.append(kv.und[0].shape[0])
        out = joint_attention(queries, keys, values, cu, max_seqlens=bounds)
        return self.action.finish(a, out[1].reshape(B, L_a, -1), mod_a)


class Motus(nn.Module):
    def __init__(self, cfg: MotusConfig):
        super().__init__()
        self.cfg = cfg
        self.video = VideoExpert(cfg.video)
        self.action = ActionExpert(cfg.action)
        self.und = UndExpert(cfg.und)
        self.blocks = nn.ModuleList(MotusBlock(cfg) for _ in range(cfg.num_layers))
        self.init_weights()
        self.activation_checkpointing = False   # set by the trainer (a run-time choice, not part of the model)

    # ---- construction ------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Fresh-model init in upstream's spirit: Xavier Linears, zero biases, small time/text MLPs, zero heads."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mlp in (self.video.text_embed, self.video.time.embed, self.action.time.embed):
            for m in mlp.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        for head in (self.video.head, self.action.head):
            nn.init.zeros_(head.weight)

    def expert_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters grouped by expert: video, action, und (block parameters go to their expert)."""
        groups: dict[str, list] = {"video": [], "action": [], "und": []}
        for name, p in self.named_parameters():
            parts = name.split(".")
            expert = parts[2] if parts[0] == "blocks" else parts[0]
            groups[expert].append((name, p))
        return groups

    def unused_parameter_names(self) -> set[str]:
        """Parameters that cannot affect any output: the und stream has no head, so the last layer's und query
        norm, output projection and FFN are dead (upstream too); without the und stream (``cfg.und_stream``
        False), all of the und expert. Trainers freeze them."""
        if not self.cfg.und_stream:
            return {n for n, _ in self.expert_parameters()["und"]}
        last = f"blocks.{len(self.blocks) - 1}.und."
        return {n for n, _ in self.named_parameters() if n.startswith((last + "o.", last + "norm_q.", last + "ffn."))}

    def param_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for _, p in v) for k, v in self.expert_parameters().items()}

    # ---- forward -----------------------------------------------------------------------------------------
    def cache_conditioning(self, cond: Conditioning, per_layer_text_kv: bool = True) -> ConditionCache:
        """Everything that depends only on the conditioning (once per request, not per denoising step)."""
        ctx = self.video.text_embed(cond.text.to(self.video.patch_embed.weight.dtype))
        text_kv = [blk.video.cross_attn.context_kv(ctx) for blk in self.blocks] if per_layer_text_kv else None
        und = None if cond.vlm is None or not self.cfg.und_stream else self.und.embed(cond.vlm, cond.vlm_lens)
        return ConditionCache(text_ctx=ctx, text_kv=text_kv, und=und)

    def forward(self, video: Tensor, t_video: Tensor, actions: Optional[Tensor], t_action: Optional[Tensor],
                cond: Conditioning, cache: Optional[ConditionCache] = None,
                time_emb: Optional[tuple] = None, kv_out: Optional[list] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Velocity prediction v = noise - x0 for both streams.

        video: noisy latents [B, C, T, H, W] (frame 0 the clean condition); t_video: [B] or per token [B, L_v],
        0..1000; actions: noisy chunk [B, K, action_dim] (None: no action stream); t_action: [B]; cond.vlm None:
        no und stream; cache: cache_conditioning(cond), if the caller reuses it across steps; time_emb:
        ``(self.video.time(t_video), self.action.time(t_action) or None)`` precomputed for these timesteps (they
        depend only on t: the inference engine tabulates them once per step grid), None computes them here;
        kv_out: a list that receives every layer's video/und keys and values (``LayerKV``), for ``action_velocity``.
        -> (video velocity [B, C, T, H, W], action velocity [B, K, action_dim] or None)
        """
        B = video.shape[0]
        grid = self.video.token_grid(video.shape)
        t_video = _per_sample(t_video, B, "t_video", allow_tokens=True)
        x = Stream(self.video.embed(video))                                    # B, L_v, Dv
        e_video, e6_video = self.video.time(t_video) if time_emb is None else time_emb[0]
        a = e_action = e6_action = None
        if actions is not None:
            a = Stream(self.action.embed(actions, cond.state))                 # B, L_a, Da
            e_action, e6_action = (self.action.time(_per_sample(t_action, B, "t_action")) if time_emb is None
                                   else time_emb[1])
        cache = cache or self.cache_conditioning(cond, per_layer_text_kv=False)
        u, cu_und = cache.und or (None, None)                                  # T_u, Du (packed)
        u = None if u is None else Stream(u)
        cos, sin = rope_tables(grid, self.cfg.head_dim, device=video.device)
        cu_video = uniform_cu_seqlens(B, x.x.shape[1], video.device)            # once for every layer
        cu_action = None if a is None else uniform_cu_seqlens(B, a.x.shape[1], video.device)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            text = cache.text_kv[i] if cache.text_kv is not None else cache.text_ctx
            kw = dict(e6_video=e6_video, e6_action=e6_action, rope=(cos, sin), text=text,
                      text_lens=cond.text_lens, cu_video=cu_video, cu_action=cu_action, cu_und=cu_und,
                      last=i == len(self.blocks) - 1,
                      video_und_see_actions=self.cfg.video_und_see_actions, kv_out=kv_out)
            if recompute:   # keep only the block inputs; recompute the block in backward
                x, a, u = torch.utils.checkpoint.checkpoint(blk, x, a, u, use_reentrant=False, **kw)
            else:
                x, a, u = blk(x, a, u, **kw)
        return self.video.unembed(x, e_video, grid), None if a is None else self.action.unembed(a, e_action)

    # ---- the video/und streams once, the action expert per step ----------------------------------------------
    def context_kv(self, video: Tensor, t_video: Tensor, cond: Conditioning, cache: Optional[ConditionCache] = None,
                   time_emb: Optional[tuple] = None) -> list[LayerKV]:
        """Every layer's video and und keys and values without the action stream: equal to what ``forward``
        records when video and und do not see actions (``cfg.video_und_see_actions`` False). time_emb: the video
        stream's ``self.video.time(t_video)``."""
        B = video.shape[0]
        grid = self.video.token_grid(video.shape)
        x = Stream(self.video.embed(video))
        _, e6_video = self.video.time(_per_sample(t_video, B, "t_video", allow_tokens=True)) if time_emb is None \
            else time_emb
        cache = cache or self.cache_conditioning(cond, per_layer_text_kv=False)
        u, cu_und = cache.und or (None, None)
        u = None if u is None else Stream(u)
        rope = rope_tables(grid, self.cfg.head_dim, device=video.device)
        kv: list[LayerKV] = []
        cu_video = uniform_cu_seqlens(B, x.x.shape[1], video.device)
        for i, blk in enumerate(self.blocks[:-1]):
            text = cache.text_kv[i] if cache.text_kv is not None else cache.text_ctx
            x, _, u = blk(x, None, u, e6_video=e6_video, e6_action=None, rope=rope, text=text,
                          text_lens=cond.text_lens, cu_video=cu_video, cu_action=None, cu_und=cu_und, last=False,
                          kv_out=kv)
        kv.append(self.blocks[-1].context_kv(x, u, e6_video=e6_video, rope=rope))   # the last layer: K/V only
        return kv

    def first_layer_inputs(self, video: Tensor, actions: Tensor, cond: Conditioning, time_emb: tuple) -> list[Tensor]:
        """The first layer's modulated attention inputs of the video and action streams (cheap: embeddings and one
        AdaLN): how much they change between steps indicates how much the velocities change (TeaCache)."""
        (_, e6_video), (_, e6_action) = time_emb
        blk = self.blocks[0]
        return [blk.video.modulated_input(self.video.embed(video), e6_video),
                blk.action.modulated_input(self.action.embed(actions, cond.state), e6_action)]

    def action_velocity(self, actions: Tensor, t_action: Tensor, cond: Conditioning, cache: ConditionCache,
                        context: list[LayerKV], time_emb: Optional[tuple] = None) -> Tensor:
        """The action expert alone, attending to the given per-layer video/und keys and values (``context_kv``, or
        ``forward``'s kv_out). time_emb: ``self.action.time(t_action)``. -> action velocity [B, K, action_dim]"""
        B = actions.shape[0]
        a = Stream(self.action.embed(actions, cond.state))
        e_action, e6_action = self.action.time(_per_sample(t_action, B, "t_action")) if time_emb is None \
            else time_emb
        cu_video = uniform_cu_seqlens(B, context[0].video[0].shape[0] // B, a.x.device)
        cu_action = uniform_cu_seqlens(B, a.x.shape[1], a.x.device)
        cu_und = None if cache.und is None else cache.und[1]
        for blk, kv in zip(self.blocks, context):
            a = blk.action_only(a, kv, e6_action=e6_action, cu_video=cu_video, cu_action=cu_action, cu_und=cu_und)
        return self.action.unembed(a, e_action)


def _per_sample(t: Tensor, B: int, name: str, allow_tokens: bool = False) -> Tensor:
    t = torch.as_tensor(t)
    if t.dim() == 0:
        return t.expand(B)
    if t.shape[0] != B or t.dim() > (2 if allow_tokens else 1):
        raise ValueError(f"{name} must have shape [B={B}]" + (" or [B, L_v]" if allow_tokens else "") +
                         f", got {tuple(t.shape)}")
    return t
