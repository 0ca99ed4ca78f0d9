"""Per-route circuit breakers: a route that keeps failing is skipped for a cool-down, then probed.
Our own: the libraries let every call through while half-open and cannot hand back a probe whose
request went away (bench/README.md, "Home-made parts and libraries")."""

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class State:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class Breakers:
    """`threshold` failures in a row open a route's breaker; after `cooldown` seconds one request may
    probe it: success closes the breaker, failure opens it for another cool-down."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.states: dict[str, State] = {}

    def allow(self, route: str) -> bool:
        """Whether to send this request to the route (claims the probe when the cool-down is over)."""
        state = self.states.get(route)
        if state is None or state.opened_at is None:
            return True
        if state.probing or self.clock() - state.opened_at < self.cooldown:
            return False
        state.probing = True
        return True

    def succeeded(self, route: str) -> None:
        self.states.pop(route, None)

    def failed(self, route: str) -> None:
        state = self.states.setdefault(route, State())
        state.failures += 1
        if state.probing or state.failures >= self.threshold:
            state.opened_at = self.clock()
        state.probing = False

    def release(self, route: str) -> None:
        """The request went away before the route answered: let another request probe it."""
        state = self.states.get(route)
        if state is not None:
            state.probing = False

    def retry_after(self, route: str) -> float:
        """Seconds until the route may be probed again (0 when it may be used now)."""
        state = self.states.get(route)
        if state is None or state.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - state.opened_at))

    def is_open(self, route: str) -> bool:
        state = self.states.get(route)
        return state is not None and state.opened_at is not None
