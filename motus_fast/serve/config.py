"""Server settings: where to listen, who may connect, request defaults and the limits a request must respect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from motus_fast.flow import MODES


@dataclass(frozen=True)
class ServeConfig:
    # network and access
    host: str = "127.0.0.1"             # localhost only unless asked otherwise
    port: int = 8000                    # 0: any free port (the bound port is printed and given to `ready`)
    api_key: Optional[str] = None       # None: no authentication
    max_message_bytes: int = 16 * 2**20
    max_connections: int = 64
    auth_timeout_s: float = 10.0        # a client authenticating by message must send it within this time
    # request defaults
    default_mode: str = "vla"
    num_frames: int = 2                 # latent frames, condition frame included (1: `vla` on the condition alone)
    execute_steps: Optional[int] = None # actions a client executes per chunk (published; None: the whole horizon)
    # request limits
    max_batch: int = 8
    max_steps: int = 50
    max_num_frames: int = 16
    max_abs_value: float = 1e4          # bound on |state| and |actions| in raw units
    max_prompt_chars: int = 1000

    def __post_init__(self):
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {self.default_mode!r}")
        if not 1 <= self.num_frames <= self.max_num_frames:
            raise ValueError(f"num_frames must be in 1..{self.max_num_frames}, got {self.num_frames}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("an API key must have at least 8 characters")
        for name in ("max_message_bytes", "max_connections", "max_batch", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
