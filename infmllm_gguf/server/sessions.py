"""Conversations and the slots they run in: which conversation a request continues, which slot
it gets, and the session files that hold the conversations not in a slot.

A conversation is found by session id (the `X-Session-Id` header, else OpenAI's `user` field)
or, without one, by the longest prefix its prompt shares with a known conversation.  When every
slot is taken, the least recently used idle conversation is saved to the sessions directory
and its slot reused; it is restored on its next request, also after a restart.

The directory is private (0700, files 0600, written to a fresh temporary file and renamed, so
a link is never followed), bounded in conversations and bytes (least recently used removed
first; 429 when nothing can be removed).  A file that cannot be loaded is set aside (renamed
`*.unusable`), never overwritten.  A save that fails keeps the conversation in its slot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infmllm_gguf.llama import Llama
from infmllm_gguf.state import StateError, write_file

__all__ = ["Busy", "Conversation", "QuotaFull", "SaveFailed", "SlotPool"]

log = logging.getLogger("infmllm_gguf.server")
SUFFIX = ".session"
SET_ASIDE = ".unusable"


class Busy(Exception):
    """No slot came free before the request's deadline: the client should retry later."""


class QuotaFull(Exception):
    """The sessions quota is full of conversations in use: no new conversation now."""


class SaveFailed(Exception):
    """A conversation could not be saved to make room; it stays in its slot."""


@dataclass
class Conversation:
    key: str  # the file stem: a hash of the session id, or a random id
    slot: int | None = None
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # while not in a slot
    last_used: float = field(default_factory=time.time)
    busy: int = 0  # requests using it now
    nbytes: int = 0  # its session file's size (0: none)


@dataclass
class Metrics:
    requests: int = 0
    rejected: int = 0
    tokens_decoded: int = 0  # prompt tokens fed and tokens generated
    request_seconds: float = 0.0
    sessions_saved: int = 0
    sessions_restored: int = 0
    sessions_removed: int = 0  # by the quotas
    sessions_set_aside: int = 0
    save_failures: int = 0
    cancelled: int = 0  # turns undone: client gone, deadline, error
    slot_wait_seconds: float = 0.0  # requests waiting for a slot to come free, summed
    status: dict[int, int] = field(default_factory=dict)  # responses by HTTP status


class SlotPool:
    """Conversations <-> the slots of one Llama.  Thread-safe; `slot_stats` and `busy_slots` are
    snapshots that readers take without waiting for any lock."""

    def __init__(self, llm: Llama, sessions_dir: str | Path, max_sessions: int, max_bytes: int):
        self.llm = llm
        self.dir = Path(sessions_dir)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._slots: list[str | None] = [None] * llm.n_slots
        self._convs: dict[str, Conversation] = {}
        self._sessions = [llm.slot(i) for i in range(llm.n_slots)]
        for session in self._sessions:
            session.restart_on_divergence = False  # a diverged request is a 409, not a reset
        self.slot_stats: list[dict[str, Any]] = [session.kv_stats() for session in self._sessions]
        self.busy_slots = 0
        for tmp in self.dir.glob(".*.tmp"):  # a save cut short by a crash
            tmp.unlink(missing_ok=True)
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):  # conversations of earlier runs
            history = _saved_history(path)
            if history is None:
                self._set_aside(path, "its history cannot be read")
                continue
            st = path.stat()
            self._convs[path.stem] = Conversation(
                path.stem, history=history, last_used=st.st_mtime, nbytes=st.st_size
            )
        with self._cond:
            self._enforce_quota(protect=None)

    @staticmethod
    def key_of(session_id: str) -> str:
        return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]

    def _path(self, conv: Conversation) -> Path:
        return self.dir / f"{conv.key}{SUFFIX}"

    @property
    def disk_bytes(self) -> int:
        return sum(c.nbytes for c in self._convs.values())

    # --- finding a conversation ------------------------------------------------------------
    def _route(self, session_id: str | None, prompt: np.ndarray, fresh: bool) -> Conversation:
        if session_id is not None:
            key = self.key_of(session_id)
            return self._convs.get(key) or self._new(key)
        best, best_common = None, 0
        for conv in [] if fresh else self._convs.values():
            history = conv.history if conv.slot is None else self._sessions[conv.slot].history
            m = min(len(history), len(prompt))
            diverge = np.flatnonzero(history[:m] != prompt[:m])
            common = int(diverge[0]) if len(diverge) else m
            # a continuation shares most of the conversation, not just a system prompt
            if common > best_common and common >= len(history) / 2:
                best, best_common = conv, common
        return best or self._new(uuid.uuid4().hex)

    def _new(self, key: str) -> Conversation:
        """A new conversation, after the quotas made room (QuotaFull where they cannot)."""
        self._enforce_quota(protect=None, extra=1)
        if len(self._convs) >= self.max_sessions or self.disk_bytes >= self.max_bytes:
            raise QuotaFull(
                f"the sessions quota ({self.max_sessions} conversations, {self.max_bytes} bytes) is "
                "full of conversations in use"
            )
        conv = Conversation(key)
        self._convs[key] = conv
        return conv

    def _enforce_quota(self, protect: str | None, extra: int = 0) -> None:
        """Remove least recently used idle conversations outside the slots until the count
        (plus `extra` to come) and the bytes on disk are within the quotas."""
        idle = sorted(
            (c for c in self._convs.values() if c.slot is None and not c.busy and c.key != protect),
            key=lambda c: c.last_used,
        )
        for conv in idle:
            if len(self._convs) + extra <= self.max_sessions and self.disk_bytes <= self.max_bytes:
                return
            try:
                self._path(conv).unlink(missing_ok=True)
            except OSError as exc:
                log.error("session %s cannot be removed: %s", conv.key, exc)
                continue
            del self._convs[conv.key]
            self.metrics.sessions_removed += 1
            log.info("session %s removed by the quota", conv.key)

    # --- slots -----------------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        """A free slot, made by saving the least recently used idle conversation if need be."""
        if None in self._slots:
            return self._slots.index(None)
        idle = [self._convs[k] for k in self._slots if k is not None and self._convs[k].busy == 0]
        failed = None
        for victim in sorted(idle, key=lambda c: c.last_used):
            slot = victim.slot
            session = self._sessions[slot]
            try:
                victim.nbytes = self._save(session, victim)
            except OSError as exc:
                failed = exc
                continue
            victim.history = np.array(session.history)
            session.reset()
            victim.slot = None
            self._slots[slot] = None
            self.metrics.sessions_saved += 1
            self._enforce_quota(protect=victim.key)
            return slot
        if failed is not None:
            raise SaveFailed(f"no slot could be freed: saving a conversation failed ({failed})")
        return None

    def _save(self, session: Llama, conv: Conversation) -> int:
        try:
            data = session.save_state().data
            write_file(self._path(conv), data)
        except OSError as exc:
            self.metrics.save_failures += 1
            log.error("saving session %s failed: %s", conv.key, exc)
            raise
        return len(data)

    def _restore(self, session: Llama, conv: Conversation) -> None:
        path = self._path(conv)
        if not path.exists():
            return
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                session.load_state(fh.read())
            self.metrics.sessions_restored += 1
        except (StateError, OSError) as exc:
            session.reset()
            conv.nbytes = 0
            self._set_aside(path, str(exc))

    def _set_aside(self, path: Path, why: str) -> None:
        aside = path.with_name(f"{path.name}.{int(time.time())}{SET_ASIDE}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            log.error("session file %s cannot be loaded (%s) nor set aside: %s", path, why, exc)
            return
        self.metrics.sessions_set_aside += 1
        log.warning("session file %s cannot be loaded (%s): set aside as %s", path, why, aside.name)

    def acquire(
        self,
        session_id: str | None,
        prompt: np.ndarray,
        deadline: float,
        cancelled: Callable[[], bool] = lambda: False,
        fresh: bool = False,
    ) -> tuple[Llama, Conversation]:
        """The slot session of the request's conversation (a new one with `fresh`), brought into
        a slot if need be; Busy if none comes free before the deadline."""
        with self._cond:
            conv = self._route(session_id, prompt, fresh)
            conv.busy += 1
            started = time.monotonic()
            try:
                slot = conv.slot
                while slot is None:
                    slot = self._free_slot()
                    if slot is not None:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or cancelled():
                        raise Busy("every slot is busy")
                    self._cond.wait(timeout=min(remaining, 0.25))
                if conv.slot is None:
                    conv.slot = slot
                    self._slots[slot] = conv.key
                    self._restore(self._sessions[slot], conv)
                self._count_busy()
            except BaseException:
                conv.busy -= 1
                raise
            finally:
                self.metrics.slot_wait_seconds += time.monotonic() - started
            return self._sessions[conv.slot], conv

    def release(self, conv: Conversation, stats: dict[str, Any] | None) -> None:
        """The request is done with conv; stats: its slot's kv_stats, taken under the session lock."""
        with self._cond:
            conv.busy -= 1
            conv.last_used = time.time()
            if stats is not None and conv.slot is not None:
                snapshot = list(self.slot_stats)
                snapshot[conv.slot] = stats
                self.slot_stats = snapshot
            self._count_busy()
            self._cond.notify_all()

    def _count_busy(self) -> None:
        self.busy_slots = sum(bool(k and self._convs[k].busy) for k in self._slots)

    def save_all(self) -> None:
        """Save every conversation in a slot (at shutdown), each on its own: one failure is logged
        and the others are still saved."""
        with self._cond:
            for slot, key in enumerate(self._slots):
                if key is None:
                    continue
                try:
                    self._convs[key].nbytes = self._save(self._sessions[slot], self._convs[key])
                    self.metrics.sessions_saved += 1
                except OSError:
                    pass  # logged by _save


def _saved_history(path: Path) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.array(npz["history"], np.int32)
    except Exception:  # noqa: BLE001 - any unreadable file is set aside
        return None
