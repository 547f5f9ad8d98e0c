"""let_io_in: a long job's yield that serves the sockets whose data arrived meanwhile."""
import socket

import gevent

from wsgateway.scheduling import let_io_in


def test_a_socket_that_became_readable_is_served_at_the_next_turn():
    ours, theirs = socket.socketpair()
    received: list[bytes] = []
    reader = gevent.spawn(lambda: received.append(ours.recv(16)))
    let_io_in()  # the reader starts and waits on its socket
    theirs.send(b"publish")
    let_io_in()
    assert received == [b"publish"]
    reader.join()
    ours.close()
    theirs.close()


def test_a_turn_does_not_wait_when_nothing_is_ready():
    started = gevent.get_hub().loop.now()
    for _ in range(100):
        let_io_in()
    gevent.get_hub().loop.update_now()
    assert gevent.get_hub().loop.now() - started < 0.05  # 100 turns, no millisecond waits
