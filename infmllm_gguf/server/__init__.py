"""An OpenAI-compatible server of many endless conversations in the sequence slots of one context.

Each conversation is a stream of its own: while it is in a slot it keeps its cells, policy
state and recall store there, bounded by the budget however long it runs; idle ones wait in
session files (`sessions.py`).  Requests are checked before they reach a session (`guard.py`:
host, API key, content type, body size; `schemas.py`, `requests.py` and `media.py`: fields,
limits, images), admitted within the capacity by the routes (`app.py`) and run as atomic
turns (`turns.py`); `metrics.py` reports them.  Built on FastAPI, uvicorn and sse-starlette,
the stack llama-cpp-python's server uses.
"""

from __future__ import annotations

import logging
from typing import Any

from infmllm_gguf.server.config import Access, Limits, ServerConfig
from infmllm_gguf.system import return_large_blocks

__all__ = ["Access", "Limits", "ServerConfig", "SlotPool", "make_app", "serve"]

log = logging.getLogger("infmllm_gguf.server")


def __getattr__(name: str) -> Any:
    """make_app and SlotPool on first use: the configuration (and the CLI's defaults) need no
    FastAPI, which only the `server` extra installs."""
    if name == "make_app":
        from infmllm_gguf.server.app import make_app

        return make_app
    if name == "SlotPool":
        from infmllm_gguf.server.sessions import SlotPool

        return SlotPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server until interrupted; conversations in slots are saved on the way out."""
    import uvicorn

    from infmllm_gguf.server.app import make_app
    from infmllm_gguf.server.sessions import SlotPool

    config.check_host(host)  # before the model loads: a refusal is immediate
    return_large_blocks()  # resident memory stays flat while request threads come and go
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("infmllm-gguf serve: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    llm = config.make_llama()
    try:
        pool = SlotPool(llm, config.sessions_dir, config.limits.max_sessions, config.limits.max_session_bytes)
        app = make_app(llm, pool, config)
        keys = f"{len(config.access.api_keys)} API key(s)" if config.access.api_keys else "no API key"
        print(
            f"infmllm-gguf serve: {config.model_id}, {config.slots} slots x {llm.n_ctx()} cells "
            f"({llm.policy!r}), sessions in {pool.dir}, {keys}, http://{host}:{port}/v1",
            flush=True,
        )
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning")
        finally:
            pool.save_all()
    finally:
        llm.close()
