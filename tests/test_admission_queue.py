"""wsgateway.admission_queue: turns for admissions, in order, bounded by progress (greenlets, no sockets)."""
from __future__ import annotations

import time

import gevent
import pytest

from tests.support import TIMEOUT_S
from wsgateway.admission_queue import AdmissionQueue, AdmissionStalled

STALL_S = 0.2


def waiters(queue: AdmissionQueue, count: int, entered: list[int]) -> list[gevent.Greenlet]:
    """`count` greenlets that enter and record their index once they have a place."""
    def enter(index: int) -> None:
        queue.enter()
        entered.append(index)
    greenlets = [gevent.spawn(enter, index) for index in range(count)]
    gevent.sleep(0)
    return greenlets


def test_at_most_places_at_once_and_the_rest_in_arrival_order():
    """3 places, 7 connects: 3 enter at once, each leave lets in the oldest waiter."""
    queue = AdmissionQueue(3, stall_s=TIMEOUT_S)
    entered: list[int] = []
    greenlets = waiters(queue, 7, entered)
    assert entered == [0, 1, 2] and queue.waiting == 4
    for expected in ([0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]):
        queue.leave(answered=True)
        gevent.sleep(0)
        assert entered == expected
    gevent.joinall(greenlets, timeout=TIMEOUT_S, raise_error=True)


def test_a_waiter_waits_past_stall_s_while_the_line_moves():
    """Answers every STALL_S/2 keep the last of 6 waiting (3 x STALL_S in all) without giving up."""
    queue = AdmissionQueue(1, stall_s=STALL_S)
    entered: list[int] = []
    greenlets = waiters(queue, 7, entered)
    while len(entered) < 7:
        gevent.sleep(STALL_S / 2)
        queue.leave(answered=True)
    gevent.joinall(greenlets, timeout=TIMEOUT_S, raise_error=True)
    assert entered == list(range(7))


def test_waiters_give_up_when_nothing_is_answered_for_stall_s():
    """No admission answered (only failed ones): the waiters raise AdmissionStalled after STALL_S, not before."""
    queue = AdmissionQueue(1, stall_s=STALL_S)
    queue.enter()
    started = time.monotonic()
    waiting = [gevent.spawn(queue.enter) for _ in range(3)]
    gevent.sleep(STALL_S / 2)
    queue.leave(answered=False)  # a failed lookup: its place goes to the first waiter, the line did not move
    gevent.joinall(waiting, timeout=TIMEOUT_S)
    assert waiting[0].successful()
    for greenlet in waiting[1:]:
        assert isinstance(greenlet.exception, AdmissionStalled)
    assert time.monotonic() - started >= STALL_S
    assert queue.waiting == 0


def test_a_place_handed_to_a_waiter_that_gives_up_goes_to_the_next():
    """A waiter killed just as its turn came passes the place on: none is lost."""
    queue = AdmissionQueue(1, stall_s=TIMEOUT_S)
    queue.enter()
    entered: list[int] = []
    first, second = waiters(queue, 2, entered)
    first.kill(block=False)  # killed ...
    queue.leave(answered=True)  # ... as the place becomes its, before it runs again
    gevent.sleep(0.01)
    assert first.dead and entered == [1]
    queue.leave(answered=True)
    queue.enter()  # the place is free again
    gevent.joinall([second], timeout=TIMEOUT_S, raise_error=True)


def test_crowded_while_as_many_wait_as_there_are_places():
    """on_crowded(True) when the waiters reach the places, (False) once they are down to half."""
    told: list[bool] = []
    queue = AdmissionQueue(4, stall_s=TIMEOUT_S, on_crowded=told.append)
    entered: list[int] = []
    greenlets = waiters(queue, 8, entered)
    assert told == [True] and queue.waiting == 4
    queue.leave(answered=True)
    gevent.sleep(0)
    assert told == [True]  # 3 waiting
    queue.leave(answered=True)
    gevent.sleep(0)
    assert told == [True, False]  # 2 waiting: half the places
    for _ in range(6):
        queue.leave(answered=True)
    gevent.joinall(greenlets, timeout=TIMEOUT_S, raise_error=True)
    assert told == [True, False]


@pytest.mark.parametrize("answered", [True, False])
def test_leave_without_waiters_frees_the_place(answered):
    """With nobody waiting a place is free again, whether or not its admission was answered."""
    queue = AdmissionQueue(1, stall_s=TIMEOUT_S)
    queue.enter()
    queue.leave(answered=answered)
    with gevent.Timeout(TIMEOUT_S):
        queue.enter()
