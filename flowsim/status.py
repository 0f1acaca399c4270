"""How a run ended: one enum, stored as its string value in the record's ``status`` attr."""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    """The ``status`` of a run (with ``status_message`` saying when and why).

    - RUNNING: being written (a killed run's record keeps it);
    - COMPLETED: reached t1;
    - DIVERGED: stopped by the integration (NaN/Inf, step-size underflow, max_steps, implicit
      stage equations that do not converge), everything saved before kept;
    - INTERRUPTED: stopped by the user (Ctrl-C), checkpointed: ``resume=True`` goes on;
    - FAILED: stopped by another error, saved and checkpointed."""

    RUNNING = "running"
    COMPLETED = "completed"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value

    @property
    def ended(self) -> bool:
        """True when the run is over for good (completed or diverged): resume returns it as it is."""
        return self in (Status.COMPLETED, Status.DIVERGED)


__all__ = ["Status"]
