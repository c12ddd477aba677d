"""Whether the worker's agent is alive: what /healthz and the `agent_up` metric report."""
from __future__ import annotations

from streams import metrics


class Health:
    """Alive until `fail`: then /healthz answers 503 with the reason, and stays so."""

    def __init__(self) -> None:
        self.reason: str | None = None
        metrics.AGENT_UP.set(1)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def fail(self, exc: BaseException) -> None:
        self.reason = f"{type(exc).__name__}: {exc}"[:500]
        metrics.AGENT_UP.set(0)

    def describe(self) -> str:
        return "running" if self.reason is None else f"crashed: {self.reason}"
