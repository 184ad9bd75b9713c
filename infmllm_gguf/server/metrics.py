"""What the server counts and how /metrics shows it: the requests in flight against the
capacity (slots plus queue), and the pool's counters and per-slot figures as Prometheus text."""

from __future__ import annotations

from dataclasses import dataclass

from infmllm_gguf.server.sessions import SlotPool
from infmllm_gguf.steps import StepStats

__all__ = ["RECALL_METRICS", "InFlight", "prometheus"]

RECALL_METRICS = (  # (metric, Prometheus type, kv_stats key) per slot, with the recall tier on
    ("recall_pages_stored", "gauge", "pages_stored"),
    ("recall_store_mb", "gauge", "store_mb"),
    ("recalls_total", "counter", "recalls"),
    ("recall_pages_recalled_total", "counter", "pages_recalled"),
)


@dataclass
class InFlight:
    """Requests being served (a stream until it ends), at most `capacity` at once.  Touched on
    the event loop only, so it needs no lock."""

    capacity: int
    n: int = 0

    def enter(self) -> bool:
        """Count one more request, or False when the server is at capacity."""
        if self.n >= self.capacity:
            return False
        self.n += 1
        return True

    def leave(self) -> None:
        self.n -= 1


def prometheus(pool: SlotPool, in_flight: int, steps: StepStats) -> str:
    """The /metrics page: the pool's counters, the decode steps' (how many sequences each
    batched, how long pieces waited for them), the slots' cells and evictions (and the recall
    tier's figures where it is on), in Prometheus' text format."""
    m = pool.metrics
    slots = pool.slot_stats
    lines = [
        "# TYPE infmllm_slots gauge",
        f"infmllm_slots {len(slots)}",
        "# TYPE infmllm_slots_busy gauge",
        f"infmllm_slots_busy {pool.busy_slots}",
        "# TYPE infmllm_requests_in_flight gauge",
        f"infmllm_requests_in_flight {in_flight}",
        "# TYPE infmllm_requests_total counter",
        f"infmllm_requests_total {m.requests}",
        "# TYPE infmllm_requests_rejected_total counter",
        f"infmllm_requests_rejected_total {m.rejected}",
        "# TYPE infmllm_turns_undone_total counter",
        f"infmllm_turns_undone_total {m.cancelled}",
        "# TYPE infmllm_errors_total counter",
        *(f'infmllm_errors_total{{status="{s}"}} {n}' for s, n in sorted(m.status.items())),
        "# TYPE infmllm_tokens_decoded_total counter",
        f"infmllm_tokens_decoded_total {m.tokens_decoded}",
        "# TYPE infmllm_tokens_per_second gauge",
        f"infmllm_tokens_per_second {m.tokens_decoded / max(m.request_seconds, 1e-9):.3f}",
        "# TYPE infmllm_slot_wait_seconds_total counter",
        f"infmllm_slot_wait_seconds_total {m.slot_wait_seconds:.6f}",
        "# TYPE infmllm_steps_total counter",
        f"infmllm_steps_total {steps.steps}",
        "# TYPE infmllm_steps_by_sequences_total counter",
        *(f'infmllm_steps_by_sequences_total{{sequences="{n}"}} {c}' for n, c in sorted(steps.sizes.items())),
        "# TYPE infmllm_step_sequences_total counter",
        f"infmllm_step_sequences_total {steps.pieces}",
        "# TYPE infmllm_step_tokens_total counter",
        f"infmllm_step_tokens_total {steps.tokens}",
        "# TYPE infmllm_step_decodes_total counter",
        f"infmllm_step_decodes_total {steps.decodes}",
        "# TYPE infmllm_step_decode_seconds_total counter",
        f"infmllm_step_decode_seconds_total {steps.decode_seconds:.6f}",
        "# TYPE infmllm_step_wait_seconds_total counter",
        f"infmllm_step_wait_seconds_total {steps.wait_seconds:.6f}",
        "# TYPE infmllm_step_timeouts_total counter",
        f"infmllm_step_timeouts_total {steps.timeouts}",
        "# TYPE infmllm_sessions_saved_total counter",
        f"infmllm_sessions_saved_total {m.sessions_saved}",
        "# TYPE infmllm_sessions_restored_total counter",
        f"infmllm_sessions_restored_total {m.sessions_restored}",
        "# TYPE infmllm_sessions_removed_total counter",
        f"infmllm_sessions_removed_total {m.sessions_removed}",
        "# TYPE infmllm_sessions_set_aside_total counter",
        f"infmllm_sessions_set_aside_total {m.sessions_set_aside}",
        "# TYPE infmllm_session_save_failures_total counter",
        f"infmllm_session_save_failures_total {m.save_failures}",
        "# TYPE infmllm_slot_cells gauge",
        *(f'infmllm_slot_cells{{slot="{i}"}} {s["n_cached"]}' for i, s in enumerate(slots)),
        "# TYPE infmllm_slot_evictions_total counter",
        *(f'infmllm_slot_evictions_total{{slot="{i}"}} {s["evictions"]}' for i, s in enumerate(slots)),
    ]
    if slots and "recalls" in slots[0]:  # the recall tier is on
        for name, kind, key in RECALL_METRICS:
            lines.append(f"# TYPE infmllm_slot_{name} {kind}")
            lines.extend(f'infmllm_slot_{name}{{slot="{i}"}} {s[key]:g}' for i, s in enumerate(slots))
    return "\n".join(lines) + "\n"
