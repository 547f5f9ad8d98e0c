from tests.helpers import receive_event


def test_publish_reaches_connected_player(gateway, tokens):
    """A message published for a connected player arrives as {"event", "payload"}."""
    client = gateway.connect(tokens.player(21))
    server = tokens.server()
    reply = gateway.publish(server, 21, "score", {"points": 5})
    assert reply.status == 200, reply.body
    assert reply.json == {"delivered": 1, "queued": False}
    assert receive_event(client) == {"event": "score", "payload": {"points": 5}}
