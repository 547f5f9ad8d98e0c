"""wsgateway.admission: the one context manager gives back a seat the connection did not take,
however the block ends, and only once."""
from __future__ import annotations

import pytest

from wsgateway.admission import Admission, OriginPolicy
from wsgateway.errors import BrokerUnavailable
from wsgateway.roster import Seat


class RecordingRoster:
    def __init__(self, *, failing: bool = False) -> None:
        self.cancelled: list[Seat] = []
        self._failing = failing

    def cancel(self, seat: Seat) -> None:
        if self._failing:
            raise BrokerUnavailable("down")
        self.cancelled.append(seat)


SEAT = Seat("21", "local/1")


def test_a_seat_not_handed_over_is_given_back_when_the_block_ends():
    """The handshake failed (or anything raised): the reservation goes back to the roster."""
    roster = RecordingRoster()
    with pytest.raises(RuntimeError):
        with Admission("21", "token", SEAT, roster):  # type: ignore[arg-type]
            raise RuntimeError("handshake failed")
    assert roster.cancelled == [SEAT]


def test_a_seat_handed_to_the_connection_is_not_given_back():
    """Once serve() hands the seat over (seat = None), leaving the block gives back nothing."""
    roster = RecordingRoster()
    with Admission("21", "token", SEAT, roster) as admission:  # type: ignore[arg-type]
        admission.seat = None
    assert roster.cancelled == []


def test_giving_back_is_once_and_survives_a_broker_outage():
    """A second exit gives back nothing more; a broker that fails lets the reservation expire by itself."""
    roster = RecordingRoster()
    admission = Admission("21", "token", SEAT, roster)  # type: ignore[arg-type]
    admission.__exit__(None, None, None)
    admission.__exit__(None, None, None)
    assert roster.cancelled == [SEAT]
    with Admission("21", "token", SEAT, RecordingRoster(failing=True)):  # type: ignore[arg-type]
        pass


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
