"""ws-gateway: a real-time WebSocket message gateway, drop-in for echoCTF's ws-server."""

__version__ = "0.1.0"
