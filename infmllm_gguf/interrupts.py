"""Interrupt safety: a native state change and its Python bookkeeping happen as one unit.

A KeyboardInterrupt is raised at whatever bytecode the main thread runs next; arriving
right after `llama_decode` returns and before Python records the tokens, it would leave
cells in the cache that the stream does not know of.  `InterruptGuard.atomic()` defers
SIGINT over such a unit and re-raises it at the end, and points Python's signal wakeup fd
at a pipe that the native abort callback (`infmllm_abort_on_fd`) watches, so a long
prefill still stops within a graph node instead of running to its end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class InterruptGuard:
    """Per-session pipe + SIGINT deferral; only the main thread receives SIGINT, so only there
    is anything deferred."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self.abort_fd = ctypes.c_int32(self._read)  # what the native abort callback polls
        self._active = False

    def close(self) -> None:
        if self._read >= 0:
            os.close(self._read)
            os.close(self._write)
            self._read = self._write = -1
            self.abort_fd.value = -1

    def _drain(self) -> None:
        try:
            while os.read(self._read, 512):
                pass
        except BlockingIOError:
            pass

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Run the block with SIGINT deferred to its end (main thread; nested blocks are one)."""
        if self._active or self._read < 0 or threading.current_thread() is not threading.main_thread():
            yield
            return
        caught: list[tuple[int, object]] = []
        try:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
        except ValueError:  # not the main interpreter: signals are not ours to handle
            yield
            return
        self._active = True
        try:
            previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
            try:
                yield
            finally:
                signal.set_wakeup_fd(previous_fd)
        except BaseException:
            caught.clear()  # an exception already leaves the block; the interrupt is part of it
            raise
        finally:
            self._active = False
            signal.signal(signal.SIGINT, previous)
            self._drain()
            if caught:
                _deliver(previous, *caught[0])


def _deliver(handler: object, signum: int, frame: object) -> None:
    """Hand a deferred SIGINT to the handler that was installed before the block."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        raise KeyboardInterrupt
