"""Exponential moving average of the trainable parameters, kept in fp32 and sharded like them (under FSDP2 the
shadow tensors are DTensors with the parameters' placements, so the checkpoint stores them sharded too)."""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, sd: dict) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(sd[n])

    def full_state_dict(self) -> dict:
        """Collective under FSDP: gathers every shard."""
        return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for n, t in self.shadow.items()}
