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
    max_connections: int = 64           # connections that may send requests (authenticated, or no key configured)
    max_unauthenticated: int = 8        # connections still owing their key message; never counted above
    auth_timeout_s: float = 2.0         # a client authenticating by message must send it within this time
    auth_message_bytes: int = 1024      # size limit of that first message (checked per frame, before buffering)
    # per-connection memory and time
    receive_queue: int = 0              # websockets' high-water mark: reading from the socket pauses once more
                                        # frames wait; (receive_queue + 2) * max_message_bytes held at most
    send_timeout_s: float = 10.0        # a reply not accepted by the client's socket within this closes it (1008)
    # decoding budget of one request (all containers together, not each)
    max_decoded_objects: int = 4096     # msgpack objects (maps, arrays, strings, numbers, ...) in one message
    max_decoded_depth: int = 8          # nesting depth (a batched request is 3 deep)
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
    # admission, fairness and micro-batching
    max_request_cost: int = 1024        # batch x latent frames x steps (x 2 when frames are decoded) of one request
    max_queued_requests: int = 32       # requests waiting for the model; beyond: "busy, retry after"
    batch_window_ms: float = 5.0        # wait this long for compatible requests to join a batch (0: no batching)
    # caches (bytes; None: a share of the device's memory, see MotusPolicy)
    instruction_cache_bytes: Optional[int] = None
    observation_cache_bytes: Optional[int] = None
    # shutdown
    shutdown_deadline_s: float = 30.0   # on SIGTERM: in-flight requests get this long to finish

    def __post_init__(self):
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {self.default_mode!r}")
        if not 1 <= self.num_frames <= self.max_num_frames:
            raise ValueError(f"num_frames must be in 1..{self.max_num_frames}, got {self.num_frames}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("an API key must have at least 8 characters")
        for name in ("max_message_bytes", "max_connections", "max_unauthenticated", "max_batch", "max_steps",
                     "auth_message_bytes", "max_decoded_objects", "max_decoded_depth",
                     "max_request_cost", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("auth_timeout_s", "send_timeout_s", "shutdown_deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.receive_queue < 0:
            raise ValueError(f"ServeConfig.receive_queue must be >= 0, got {self.receive_queue}")
        if self.batch_window_ms < 0:
            raise ValueError(f"ServeConfig.batch_window_ms must be >= 0, got {self.batch_window_ms}")
        for name in ("instruction_cache_bytes", "observation_cache_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"ServeConfig.{name} must be >= 0 or None, got {getattr(self, name)}")
