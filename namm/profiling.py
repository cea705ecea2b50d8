"""Section timers: where a run's wall time goes (``namm bench`` splits the NAMM's share with them).

Code that wants to be measured wraps a section in ``with timer("features"):``. The default timer,
:data:`NULL_TIMER`, hands back one shared no-op context, so an unmeasured run pays one call per
section and nothing else. A :class:`SectionTimer` adds up *exclusive* wall time per section: a
section entered inside another pauses the outer one, so the sections never count a second twice
and their sum is at most the run's wall time.

The engine's sections (see :mod:`namm.attention`, :mod:`namm.sequence`, :mod:`namm.policies.namm`):
``attention read`` (eager attention and the per-group mean handed to the policy), ``features``
(the policy folding attention into its per-token state, and token features at eviction steps),
``scorer`` (the NAMM's network), ``cache gather`` (choosing the kept tokens and gathering the
cache and the policy's state down to them).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

__all__ = ["NULL_TIMER", "SECTIONS", "NullTimer", "SectionTimer"]

#: the engine's sections, in the order a step runs them
SECTIONS = ("attention read", "features", "scorer", "cache gather")


class NullTimer:
    """The timer of an unmeasured run: every section is one shared no-op context."""

    _section = nullcontext()

    def __call__(self, name: str) -> nullcontext:
        return self._section


NULL_TIMER = NullTimer()


class SectionTimer:
    """Exclusive wall time and call counts per named section.

    sync: called at every section boundary when given (e.g. ``torch.cuda.synchronize`` so GPU
    work is charged to the section that launched it; that costs the GPU its overlap).
    clock: the time source, in seconds.
    """

    def __init__(self, sync=None, clock=time.perf_counter) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._sync, self._clock = sync, clock
        self._stack: list[str] = []
        self._since = 0.0  # when the innermost open section last (re)started

    def __call__(self, name: str) -> _Section:
        return _Section(self, name)

    def _charge(self) -> float:
        """Add the time since the last boundary to the innermost open section; returns now."""
        if self._sync is not None:
            self._sync()
        now = self._clock()
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._since
        return now

    def enter(self, name: str) -> None:
        self._since = self._charge()
        self._stack.append(name)
        self.calls[name] = self.calls.get(name, 0) + 1

    def exit(self) -> None:
        now = self._charge()
        self._stack.pop()
        self._since = now

    def total(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class _Section:
    __slots__ = ("timer", "name")

    def __init__(self, timer: SectionTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer.enter(self.name)

    def __exit__(self, *exc) -> None:
        self.timer.exit()
