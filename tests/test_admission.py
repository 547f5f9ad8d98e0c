"""wsgateway.admission: the one context manager gives back a seat the connection did not take,
however the block ends, and only once."""
from __future__ import annotations

import pytest

from wsgateway.admission import Admission, OriginPolicy
from wsgateway.roster import Seat


class RecordingDelivery:
    """What an admission gives its seat back to (`Delivery.cancel`, which also waits out a
    broker outage: see test_cluster_faults)."""

    def __init__(self) -> None:
        self.cancelled: list[Seat] = []

    def cancel(self, seat: Seat) -> None:
        self.cancelled.append(seat)


SEAT = Seat("21", "local/1")


def test_a_seat_not_handed_over_is_given_back_when_the_block_ends():
    """The handshake failed (or anything raised): the reservation is given back."""
    delivery = RecordingDelivery()
    with pytest.raises(RuntimeError):
        with Admission("21", "token", SEAT, delivery):  # type: ignore[arg-type]
            raise RuntimeError("handshake failed")
    assert delivery.cancelled == [SEAT]


def test_a_seat_handed_to_the_connection_is_not_given_back():
    """Once serve() hands the seat over (seat = None), leaving the block gives back nothing."""
    delivery = RecordingDelivery()
    with Admission("21", "token", SEAT, delivery) as admission:  # type: ignore[arg-type]
        admission.seat = None
    assert delivery.cancelled == []


def test_giving_back_is_once():
    """A second exit gives back nothing more."""
    delivery = RecordingDelivery()
    admission = Admission("21", "token", SEAT, delivery)  # type: ignore[arg-type]
    admission.__exit__(None, None, None)
    admission.__exit__(None, None, None)
    assert delivery.cancelled == [SEAT]


@pytest.mark.parametrize("allowed, origin, allows", [
    ((), "https://evil.example", True),
    (("https://a.example",), "https://a.example/", True),
    (("https://a.example",), "http://a.example", False),
    (("a.example:8443",), "https://a.example:8443", True),
    (("a.example",), None, True),
])
def test_origin_policy(allowed, origin, allows):
    """-origins: empty allows any; with a scheme exact, without one the host[:port]; no Origin is allowed."""
    assert OriginPolicy(allowed).allows(origin) is allows
