"""deita_hub.cpu: the thread count deita-hub uses and its order-keeping map."""

import threading
import time

import pytest

from deita_hub.cpu import cores, ordered_map


def test_cores_is_what_the_process_may_run_on():
    assert 1 <= cores()


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_ordered_map_keeps_the_order_whatever_finishes_first(threads):
    def slow_for_small(x):
        time.sleep(0.002 * (10 - x % 10))  # earlier items finish later
        return x * x

    assert list(ordered_map(slow_for_small, range(40), threads)) == [x * x for x in range(40)]


def test_ordered_map_computes_at_most_its_threads_ahead_and_stops_with_the_consumer():
    started: list[int] = []
    lock = threading.Lock()

    def record(x):
        with lock:
            started.append(x)
        return x

    results = ordered_map(record, range(1000), 2)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    time.sleep(0.05)
    # What was consumed, what is in flight, and the one submitted before the yield.
    assert len(started) <= 5 + 2 + 1
    results.close()
    time.sleep(0.05)
    assert len(started) <= 5 + 2 + 1


def test_ordered_map_raises_the_items_error_in_order():
    def fail_on_three(x):
        if x == 3:
            raise ValueError("three")
        return x

    results = ordered_map(fail_on_three, range(10), 2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three"):
        next(results)
