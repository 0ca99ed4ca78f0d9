"""Work split over several upstream calls (qubax.providers.batches)."""

import pytest

from qubax.errors import TaskFailed
from qubax.providers import GeneratedImage
from qubax.providers.batches import batch_sizes, whole_batch


@pytest.mark.parametrize(("n", "most", "sizes"), [(1, 4, [1]), (4, 4, [4]), (10, 4, [4, 4, 2]), (3, 1, [1, 1, 1])])
def test_n_images_go_in_calls_of_at_most_so_many(n: int, most: int, sizes: list[int]) -> None:
    assert batch_sizes(n, most) == sizes


def test_a_batch_that_came_back_short_fails_with_the_images_it_holds() -> None:
    made = [GeneratedImage(b"one"), GeneratedImage(b"two")]
    assert whole_batch(made, 2, "Acme") is made
    with pytest.raises(TaskFailed) as caught:
        whole_batch(made, 3, "Acme")
    assert caught.value.message == "Acme returned 2 of the 3 images asked for."
    assert caught.value.images == made and caught.value.failover  # kept (and billed); the rest may go elsewhere
