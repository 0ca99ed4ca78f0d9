from qubax.routing.breaker import Breakers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_probes_once_after_cooldown() -> None:
    clock = Clock()
    breakers = Breakers(threshold=3, cooldown=30, clock=clock)
    for _ in range(2):
        breakers.failed("bfl")
        assert breakers.allow("bfl")
    breakers.failed("bfl")
    assert not breakers.allow("bfl")
    assert breakers.retry_after("bfl") == 30
    clock.now += 29
    assert not breakers.allow("bfl")
    clock.now += 1
    assert breakers.allow("bfl")  # the probe
    assert not breakers.allow("bfl")  # only one at a time
    breakers.succeeded("bfl")
    assert breakers.allow("bfl") and breakers.allow("bfl")
    assert not breakers.is_open("bfl")


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    clock = Clock()
    breakers = Breakers(threshold=1, cooldown=10, clock=clock)
    breakers.failed("fal")
    clock.now += 10
    assert breakers.allow("fal")
    breakers.failed("fal")
    assert not breakers.allow("fal")
    assert breakers.retry_after("fal") == 10


def test_a_released_probe_can_be_claimed_again() -> None:
    clock = Clock()
    breakers = Breakers(threshold=1, cooldown=10, clock=clock)
    breakers.failed("fal")
    clock.now += 10
    assert breakers.allow("fal")
    breakers.release("fal")  # the request was cancelled before the route answered
    assert breakers.allow("fal")


def test_success_resets_the_count_and_routes_are_independent() -> None:
    breakers = Breakers(threshold=2, cooldown=10, clock=Clock())
    breakers.failed("a")
    breakers.succeeded("a")
    breakers.failed("a")
    assert breakers.allow("a")
    breakers.failed("b")
    breakers.failed("b")
    assert not breakers.allow("b") and breakers.allow("a")
