"""What `infmllm-gguf serve` runs and what it lets a request do: the model and slots, the
limits on one request, and who may call it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from infmllm_gguf.llama import Llama
from infmllm_gguf.recall import Recall

__all__ = ["Access", "Limits", "ServerConfig", "is_loopback"]

MiB = 2**20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class Limits:
    """Bounds on one request (beyond them: 400, 413 for the body) and on the sessions kept."""

    max_tokens: int = 4096  # generated tokens a request may ask for; no max_tokens: min(n_ctx, this)
    max_prompt_tokens: int = 65536  # tokens a request's prompt may render to
    max_images: int = 8  # images in one request
    max_image_bytes: int = 8 * MiB  # one encoded image
    max_image_pixels: int = 4096 * 4096  # width x height, read from the image's header
    max_body_bytes: int = 32 * MiB  # the request body (images travel in it as data: URLs)
    timeout: float = 600.0  # seconds per request, waiting for a slot included
    max_sessions: int = 1000  # conversations kept, in slots and on disk
    max_session_bytes: int = 16 * 1024 * MiB  # session files on disk
    max_stops: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters in one stop string
    max_top_logprobs: int = 20  # top_logprobs (chat) and logprobs (completions), as OpenAI
    max_embedding_inputs: int = 2048  # texts in one /v1/embeddings request, as OpenAI

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class Access:
    """Who may call the server and what of the machine a request may reach."""

    api_keys: tuple[str, ...] = ()  # Bearer keys; none: no authentication
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host header names ("*": any)
    media_path: Path | None = None  # local image files are served from here only; None: none
    metrics: bool = False  # expose /metrics
    strict_model_name: bool = False  # a request naming another model gets 404 (else: served)
    insecure: bool = False  # allow a non-loopback --host without an API key


@dataclass
class ServerConfig:
    """What `infmllm-gguf serve` runs: a model, a policy per slot, the slots and the queue."""

    model: str | None = None
    mmproj: str | None = None
    kv_policy: str = "infmllm"
    budget: int = 1024
    reposition: bool = True
    flash_attn: bool = False
    n_ctx: int | None = None  # per slot; default budget + chunk
    slots: int = 8
    sessions_dir: str = "infmllm-sessions"
    max_queue: int = 32
    model_alias: str | None = None
    recall: Recall | None = None  # the recall tier of every slot's stream
    n_threads: int | None = None
    pooling: str = "mean"  # /v1/embeddings: one vector per input
    limits: Limits = field(default_factory=Limits)
    access: Access = field(default_factory=Access)

    @property
    def model_id(self) -> str:
        return self.model_alias or (Path(self.model).stem if self.model else "smollm2-135m")

    def check_host(self, host: str) -> None:
        """Refuse to listen beyond this machine without an API key, unless told --insecure."""
        if not is_loopback(host) and not self.access.api_keys and not self.access.insecure:
            raise ValueError(
                f"--host {host} reaches beyond this machine: give --api-key (or --api-key-file), "
                "or --insecure to serve without one"
            )

    def make_llama(self) -> Llama:
        from infmllm_gguf._llama_cpp import llama_cpp as lc
        from infmllm_gguf.policies import make_policy

        policy = make_policy(self.kv_policy, budget=self.budget, reposition=self.reposition)
        n_ctx = self.n_ctx or (policy.capacity if policy.evicts else 2048)
        return Llama(
            self.model, kv_policy=policy, n_ctx=n_ctx, n_slots=self.slots, mmproj_path=self.mmproj,
            recall=self.recall, embedding=True, n_threads=self.n_threads, seed=0,
            flash_attn=self.flash_attn,
            pooling_type=getattr(lc, f"LLAMA_POOLING_TYPE_{self.pooling.upper()}"),
        )  # fmt: skip


def is_loopback(host: str) -> bool:
    """Whether host (a name or an address to listen on) is this machine only."""
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
