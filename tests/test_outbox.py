"""wsgateway.outbox on a socket pair: where the frames are is one state, and each way out of it."""
from __future__ import annotations

import socket

from tests.support import wait_for
from wsgateway.errors import CloseCode
from wsgateway.outbox import Flusher, Outbox, OutboxLimits, OutboxState


class Owner:
    """Stands in for the connection: records what the outbox asked of it."""

    player_id, remote = "7", "127.0.0.1"

    def __init__(self) -> None:
        self.outbox: Outbox | None = None
        self.failures: list[CloseCode] = []

    def flush(self) -> None:
        assert self.outbox is not None
        self.outbox.flush()

    def abort(self, code: CloseCode) -> None:
        self.failures.append(code)
        assert self.outbox is not None
        self.outbox.discard()


def outbox(max_frames: int = 100) -> tuple[Outbox, socket.socket, Owner]:
    server_end, client_end = socket.socketpair()
    owner = Owner()
    owner.outbox = Outbox(server_end, OutboxLimits(max_frames, 1 << 30, write_timeout_s=5), owner, Flusher())
    return owner.outbox, client_end, owner


def test_a_frame_goes_straight_out_when_nothing_waits():
    """EMPTY: write() sends at once and stays EMPTY."""
    box, client_end, _ = outbox()
    assert box.write(b"frame") and box.state is OutboxState.EMPTY
    assert client_end.recv(100) == b"frame"


def test_frames_for_the_flusher_wait_queued_then_leave_together():
    """write_later: QUEUED until the flusher's turn, then EMPTY with everything sent in order."""
    box, client_end, _ = outbox()
    assert box.write_later(b"one") and box.write_later(b"two") and box.write(b"three")
    assert box.state is OutboxState.QUEUED and len(box) == 3
    wait_for(lambda: box.state is OutboxState.EMPTY, what="the flusher's turn")
    client_end.settimeout(5)
    received = b""
    while len(received) < 11:
        received += client_end.recv(100)
    assert received == b"onetwothree"


def test_what_the_kernel_does_not_take_is_drained_by_a_writer():
    """A write larger than the socket buffer: DRAINING until the client has read it all, then EMPTY."""
    box, client_end, _ = outbox()
    big = b"x" * (8 << 20)
    assert box.write(big) and box.state is OutboxState.DRAINING
    client_end.settimeout(5)
    received = 0
    while received < len(big):
        received += len(client_end.recv(1 << 20))
    wait_for(lambda: box.state is OutboxState.EMPTY, what="the writer done")


def test_past_the_bound_the_owner_is_told_and_the_backlog_dropped():
    """More frames than max_frames: the owner is aborted with SLOW_CONSUMER, and discard() leaves it EMPTY."""
    box, _, owner = outbox(max_frames=2)
    assert box.write_later(b"1") and box.write_later(b"2")
    assert not box.write_later(b"3")
    assert owner.failures == [CloseCode.SLOW_CONSUMER]
    assert box.state is OutboxState.EMPTY and len(box) == 0
