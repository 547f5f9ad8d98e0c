"""Message history and resumable streams: ids, what is kept, and what a resuming
connection is owed.

Every message to a player (`/publish`, `/publish/batch`, `/broadcast` with `player_id`)
joins that player's stream; every broadcast to all players joins the one broadcast
stream, which is part of every player's stream without costing anything per player.
A connection that asks for ids (`last_event_id`) gets each frame as
`{"event": E, "payload": P, "id": "<id>"}`; the others get exactly today's frames.

Ids. An id says where a connection stands in both streams after the frame that
carried it; it is opaque to clients (compare for equality only):

* a player message: `<epoch>.<generation>.<player seq>.<broadcast seq>` -- the player's
  seq-th message, published when broadcast number `<broadcast seq>` was the latest;
* a broadcast: `<epoch>.<broadcast seq>` -- the same frame for every player; where the
  player stands in its own stream follows from the order below: it has had every
  player message published before that broadcast, and none published after it.

`epoch` names one life of the whole history (a process without -broker, or one Redis
data set): an id of another epoch is from a history that was lost. `generation` names one
life of a player's stream (forgotten when idle, see below). Both are checked on resume.

Ordering. A player message published while broadcast b is the latest goes after b and
before b+1 on every socket (the hub keeps a broadcast's frame ahead of anything sent
after it started). A replay merges the two streams in exactly that order, so a resumed
stream is the live stream, from the position on: none twice, none skipped. Live frames
that arrive while the replay is fetched are held behind it and those the replay already
carried are dropped (`Replay.replayed`). So are those that arrive later still but are
not past the point the replay brought the connection to (`Replay.through`): with
-broker, a gateway's reader that fell behind hands over, after the connection was
released, messages that were in its stream before the replay was read (and a message
routed again from a gateway where the player's connection closed comes late too).

Memory. Each stream keeps at most `-history-size` messages, each at most `-history-ttl`;
all streams together at most `-max-history-bytes` accounted bytes (the frame with its id
plus `ENTRY_OVERHEAD_BYTES`), past which the oldest message of any stream is given up
first. A player stream that holds nothing is forgotten after `STREAM_RETENTION_S` idle
(or when more than `MAX_PLAYER_STREAMS` exist): what it still knew (which broadcast the
last message it gave up followed) is folded into one number, so a resume that would need
it is refused rather than answered wrongly. A player message's frame is encoded once,
with its id, for every connection that asked for ids; the offline queue keeps its
own (legacy) frames and a connection with ids takes its backlog from the history.

A resume that cannot be honoured (id malformed, of another epoch or generation, or
older than what is kept) starts with `{"event": "gateway.missed", "payload":
{"recovered": false, "reason": ..., "oldest_id": ...}}` followed by every kept message.
An empty `last_event_id` means "no position yet": the connection gets what was queued
for the player while it was offline (as a legacy connection gets its backlog), with ids.

The seam for transports (WebSocket here, Server-Sent Events):

* the transport's connection is a `delivery.HeldConnection` with `wants_ids = True`
  (`hub.Deliverable`), and `release(first, replayed)` sends `first`, then what it held
  since `hold()` except the frames whose `event_id` is in `replayed`;
* admission as for `/ws`, then `Delivery.connect(connection, seat, last_event_id)`
  (`""` for none yet; None only for a connection that wants today's frames) and
  `Delivery.disconnect(connection, seat)` at the end;
* what reaches `send`/`send_later`/`release` are WebSocket text frames: `Stamped` ones
  (with the id) when the gateway keeps a history, plain ones otherwise and for the
  `gateway.missed` notice. `message_parts(frame)` gives (id or None, event, payload
  text), split once per message for all connections; a transport may keep its own
  encoding of a message in `Stamped.encodings[name]`, built once for all its connections.
"""
from __future__ import annotations

import heapq
import itertools
import json as _json
import re
import secrets
import time
from collections import OrderedDict, deque
from typing import Callable, Iterable, NamedTuple, Protocol

from wsgateway.config import Config
from wsgateway.frames import text_frame
from wsgateway.protocol import event_frame

_decoder = _json.JSONDecoder()
MISSED_EVENT = "gateway.missed"
MAX_ID_LENGTH = 128  # longer last_event_id values are malformed, not parsed
# What one kept message costs besides its frame: the Stamped object's attribute dict, its
# id, the deque and arrival slots: 603 bytes per message of 86 measured with tracemalloc on
# CPython 3.11 (bench/history.py memory: 20,000 messages to 1,000 players).
ENTRY_OVERHEAD_BYTES = 520
STREAM_RETENTION_S = 24 * 3600.0  # an empty player stream is forgotten after this long idle
MAX_PLAYER_STREAMS = 100_000  # and past this many streams the idlest go first

# Why a resume was not honoured (the notice's "reason").
REASON_MALFORMED = "malformed"
REASON_LOST = "history_lost"  # another epoch or generation: the history it came from is gone
REASON_TOO_OLD = "too_old"  # what came after it is no longer all kept
REASON_OFF = "history_off"  # the gateway keeps no history (-history-size 0)

_NUMBER = r"(0|[1-9][0-9]{0,18})"
_TOKEN = r"([0-9a-z]{1,16})"
_PLAYER_ID = re.compile(rf"{_TOKEN}\.{_TOKEN}\.{_NUMBER}\.{_NUMBER}")
_BROADCAST_ID = re.compile(rf"{_TOKEN}\.{_NUMBER}")


class Stamped(bytes):
    """The text frame of one kept message with its id: `{"event", "payload", "id"}`.

    Built once per message; the same object goes to every connection that asked for ids,
    and is what the history keeps. `player_seq` is 0 for a broadcast to all players.
    `encodings`: what other transports built from it (e.g. Server-Sent Events), once."""

    event_id: str
    player_seq: int
    broadcast_seq: int
    encodings: dict[str, bytes]  # what other transports built from it, once, by their name
    # Set only when they change (class defaults: a publish sets four attributes, not eight).
    expires_at: float = 0.0
    queued: bool = False  # it went to the player's offline queue
    removed: bool = False  # it left the history
    parts: MessageParts | None = None  # see `message_parts`

    @property
    def json(self) -> bytes:
        """The message's legacy JSON text, without the id (`{"event":..,"payload":..}`)."""
        return frame_text(self)[:-len(self.event_id) - 9] + b"}"  # less `,"id":"<id>"`


def stamp(json: bytes, event_id: str, player_seq: int, broadcast_seq: int, expires_at: float = 0.0) -> Stamped:
    """The id-carrying frame for a message's JSON text (`{"event":..,"payload":..}`)."""
    frame = Stamped(text_frame(b"%s,\"id\":\"%s\"}" % (json[:-1], event_id.encode("ascii"))))
    frame.event_id = event_id
    frame.player_seq = player_seq
    frame.broadcast_seq = broadcast_seq
    frame.encodings = {}
    if expires_at:
        frame.expires_at = expires_at
    return frame


def restamp(frame: bytes, event_id: str) -> Stamped | None:
    """The stamped frame of a message that crossed processes with its id (built once per
    message by each gateway that receives it); None for an id that is not one of ours."""
    position = parse_event_id(event_id)
    if position is None:
        return None
    return stamp(frame_text(frame), event_id, position.player_seq, position.broadcast_seq)


def frame_text(frame: bytes) -> bytes:
    """The payload of an unmasked server text frame (`frames.encode_frame`'s header)."""
    length = frame[1] & 0x7F
    return frame[2:] if length < 126 else frame[4:] if length == 126 else frame[10:]


class MessageParts(NamedTuple):
    """A message as a transport other than WebSocket writes it (Server-Sent Events)."""

    event_id: str | None  # None: a frame without an id (a notice, or no history)
    event: str
    payload: bytes  # the payload's JSON text, compact, one line


def message_parts(frame: bytes) -> MessageParts:
    """The id, event and payload text of a message frame (what `Hub` hands to a
    connection). Split once per message for a `Stamped` frame (every connection gets
    the same object); a plain frame is split on each call."""
    if isinstance(frame, Stamped):
        if frame.parts is None:
            frame.parts = _parts(frame.json, frame.event_id)
        return frame.parts
    return _parts(frame_text(frame), None)


def _parts(json: bytes, event_id: str | None) -> MessageParts:
    """Split `{"event":E,"payload":P}` (protocol.event_json's form) without re-encoding
    P, so that its text (big integers, key order) stays exactly as published."""
    text = json.decode("utf-8", "surrogatepass")
    event, end = _decoder.raw_decode(text, len('{"event":'))
    return MessageParts(event_id, event, text[end + len(',"payload":'):-1].encode("utf-8", "surrogatepass"))


class Position(NamedTuple):
    """Where an id says a connection stands. `generation` None: after a broadcast."""

    epoch: str
    broadcast_seq: int
    generation: str | None = None
    player_seq: int = 0


def player_event_id(epoch: str, generation: str, player_seq: int, broadcast_seq: int) -> str:
    return f"{epoch}.{generation}.{player_seq}.{broadcast_seq}"


def broadcast_event_id(epoch: str, broadcast_seq: int) -> str:
    return f"{epoch}.{broadcast_seq}"


def parse_event_id(text: str) -> Position | None:
    """The position an id names, or None when it is not one of ours."""
    if len(text) > MAX_ID_LENGTH:
        return None
    if match := _PLAYER_ID.fullmatch(text):
        epoch, generation, player_seq, broadcast_seq = match.groups()
        return Position(epoch, int(broadcast_seq), generation, int(player_seq))
    if match := _BROADCAST_ID.fullmatch(text):
        return Position(match.group(1), int(match.group(2)))
    return None


class PlayerView(NamedTuple):
    """A player stream as a replay needs it (from memory or from Redis)."""

    generation: str
    seq: int  # the latest message's seq (0: none yet)
    trimmed_seq: int  # every message after this seq is kept
    trimmed_after: int  # the broadcast seq the last message given up followed (-1: none given up)
    created_after: int  # the broadcast seq that was the latest when the stream was created
    taken_through: int  # queued messages up to this seq went to a connection already
    entries: list[Stamped]


class BroadcastView(NamedTuple):
    seq: int
    trimmed_seq: int
    entries: list[Stamped]


class StreamPoint:
    """A point in one player's stream, in the ids' order (see Ordering above): what a
    resumed connection had before it or was replayed up to it. A live frame that `covers`
    says is at or before the point is one the connection has had already."""

    __slots__ = ("broadcast_seq", "player_seq", "_epoch_prefix", "_generation_prefix")

    def __init__(self, position: Position) -> None:
        self.broadcast_seq = position.broadcast_seq
        self.player_seq = position.player_seq
        self._epoch_prefix = f"{position.epoch}."
        self._generation_prefix = f"{position.epoch}.{position.generation}." if position.generation else ""

    def covers(self, frame: bytes) -> bool:
        """Whether `frame` is a message at or before this point. Not a `Stamped` frame
        (a notice, a local-only delivery), another epoch, or another generation of the
        player's stream (a later one: the earlier was forgotten): no."""
        if not isinstance(frame, Stamped) or not frame.event_id.startswith(self._epoch_prefix):
            return False
        if frame.broadcast_seq != self.broadcast_seq:
            return frame.broadcast_seq < self.broadcast_seq
        if not frame.player_seq:
            return True  # the broadcast the point is at, or after
        return frame.player_seq <= self.player_seq and frame.event_id.startswith(self._generation_prefix)


class Replay(NamedTuple):
    """What a connection is sent first: `frames` (the notice first when not `recovered`);
    `replayed` names them, so that live frames held meanwhile are not sent twice.
    `through`: where the replay leaves the connection in the player's stream, when it
    sends everything kept after a point (None for the offline backlog of an empty id):
    live frames at or before it are never sent, however late they come."""

    frames: list[bytes]
    recovered: bool
    replayed: frozenset[str]
    reason: str = ""
    through: StreamPoint | None = None


def missed_notice(reason: str, oldest_id: str | None, kept: int) -> bytes:
    """`gateway.missed` for a resume that cannot be honoured: what follows is every
    message kept (`kept`), the oldest of them `oldest_id` (null when none)."""
    return event_frame(MISSED_EVENT, {"recovered": False, "reason": reason, "oldest_id": oldest_id, "kept": kept})


def plan_replay(epoch: str, player: PlayerView | None, broadcasts: BroadcastView, last_event_id: str,
                forgotten_after: int = -1) -> Replay:
    """What a connection resuming from `last_event_id` is owed (see the module docstring).

    `forgotten_after`: the latest broadcast seq that a message given up by a forgotten
    player stream followed (-1: none)."""
    if last_event_id == "":
        queued = [entry for entry in player.entries if entry.queued and entry.player_seq > player.taken_through] \
            if player is not None else []
        return Replay(queued, True, frozenset(entry.event_id for entry in queued))
    position = parse_event_id(last_event_id)
    reason = _unhonourable(epoch, player, broadcasts, position, forgotten_after)
    if reason:
        own = player.entries if player is not None else []
        kept = list(_merged(own, broadcasts.entries))
        notice = missed_notice(reason, kept[0].event_id if kept else None, len(kept))
        return Replay([notice, *kept], False, frozenset(entry.event_id for entry in kept), reason,
                      _point_after(kept, None))
    assert position is not None
    if position.generation is not None:
        own = [entry for entry in player.entries if entry.player_seq > position.player_seq] if player else []
    else:
        own = [entry for entry in player.entries if entry.broadcast_seq >= position.broadcast_seq] if player else []
    others = [entry for entry in broadcasts.entries if entry.broadcast_seq > position.broadcast_seq]
    frames = list(_merged(own, others))
    return Replay(frames, True, frozenset(frame.event_id for frame in frames), "", _point_after(frames, position))


def _point_after(frames: list[Stamped], start: Position | None) -> StreamPoint | None:
    """The point a connection stands at after `frames` (the stream from `start` on)."""
    position = parse_event_id(frames[-1].event_id) if frames else start
    return StreamPoint(position) if position is not None else None


def _unhonourable(epoch: str, player: PlayerView | None, broadcasts: BroadcastView,
                  position: Position | None, forgotten_after: int) -> str:
    """Why `position` cannot be resumed from, or "" when it can."""
    if position is None:
        return REASON_MALFORMED
    if position.epoch != epoch or position.broadcast_seq > broadcasts.seq:
        return REASON_LOST
    if position.broadcast_seq < broadcasts.trimmed_seq:
        return REASON_TOO_OLD  # broadcasts after it were given up
    if position.generation is not None:  # after one of the player's own messages
        if player is None or player.generation != position.generation or position.player_seq > player.seq:
            return REASON_LOST
        return REASON_TOO_OLD if position.player_seq < player.trimmed_seq else ""
    # after a broadcast: every player message published after it must still be kept
    if player is None or player.created_after >= position.broadcast_seq:
        if forgotten_after >= position.broadcast_seq:
            return REASON_TOO_OLD  # a forgotten stream may have held messages after it
        if player is None:
            return ""
    return REASON_TOO_OLD if player.trimmed_after >= position.broadcast_seq else ""


def _merged(own: Iterable[Stamped], broadcasts: Iterable[Stamped]) -> Iterable[Stamped]:
    """Both streams in live order: a player message after the broadcast it followed."""
    return heapq.merge(own, broadcasts, key=lambda entry: (entry.broadcast_seq, entry.player_seq))


class History(Protocol):
    """Kept messages and their ids. In memory (`MemoryHistory`) nothing yields; the Redis
    one (`history_redis`) may block the calling greenlet and raises `BrokerUnavailable`.

    A player message gets its id in the roster's route step (`Roster.route`), from the
    history the roster was given, and is marked queued there, or in `Roster.requeue` when
    a copy routed live goes to the queue; a broadcast to all gets its id here."""

    sends: bool  # record_broadcast also hands the broadcast to every gateway (the broker must not)

    def record_broadcast(self, frame: bytes) -> Stamped | None:
        """Give a broadcast to every player its id and keep it once, in the broadcast
        stream; the id-carrying frame (None when `sends`: the gateways build it)."""

    def replay(self, player_id: str, last_event_id: str) -> Replay:
        """What a connection resuming from `last_event_id` is sent before live frames.
        Queued messages count as taken afterwards (an empty id gets them once)."""

    def note_taken(self, player_id: str) -> None:
        """A connection without ids took the player's offline backlog."""

    def maintain(self) -> int:
        """Give up expired messages, forget idle streams; return messages given up."""


def keeps_history(config: Config) -> bool:
    """-history-size and -history-ttl both above zero."""
    return config.history_size > 0 and config.history_ttl_s > 0


class _Stream:
    """One stream in memory: its messages, oldest first, and what it gave up."""

    __slots__ = ("generation", "seq", "trimmed_seq", "trimmed_after", "created_after", "taken_through",
                 "entries", "last_active")

    def __init__(self, generation: str, created_after: int, now: float) -> None:
        self.generation = generation
        self.seq = 0
        self.trimmed_seq = 0
        self.trimmed_after = -1
        self.created_after = created_after
        self.taken_through = 0
        self.entries: deque[Stamped] = deque()
        self.last_active = now


class MemoryHistory:
    """`History` in this process's memory; its epoch is new with every process."""

    sends = False

    def __init__(self, max_per_stream: int, ttl_s: float, max_total_bytes: int = 0,
                 clock: Callable[[], float] = time.monotonic, epoch: str | None = None) -> None:
        self.max_per_stream = max_per_stream
        self.ttl_s = ttl_s
        self.max_total_bytes = max_total_bytes  # 0 = no bound
        self.epoch = epoch or secrets.token_hex(4)
        self._clock = clock
        self._generations = itertools.count(1)
        self._players: OrderedDict[str, _Stream] = OrderedDict()  # idlest first
        self._broadcasts = _Stream("", 0, clock())
        self._arrivals: deque[tuple[Stamped, _Stream]] = deque()  # every kept message, oldest first
        self._stale_arrivals = 0
        self._size = 0
        self._bytes = 0
        self._forgotten_after = -1
        self.given_up = 0  # messages given up (expired, or past a bound), for the metrics

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._size

    def record(self, player_id: str, frame: bytes) -> Stamped:
        """Give a message to one player its id and keep it (`LocalRoster.route` calls
        this); the id-carrying frame."""
        now = self._clock()
        stream = self._players.get(player_id)
        if stream is None:
            stream = self._players[player_id] = _Stream(format(next(self._generations), "x"),
                                                        self._broadcasts.seq, now)
        else:
            self._players.move_to_end(player_id)
        stream.seq += 1
        stream.last_active = now
        broadcast_seq = self._broadcasts.seq
        entry = stamp(frame_text(frame), player_event_id(self.epoch, stream.generation, stream.seq, broadcast_seq),
                      stream.seq, broadcast_seq, now + self.ttl_s)
        self._keep(stream, entry, now)
        if len(self._players) > MAX_PLAYER_STREAMS:
            self._forget_idle(now)
        return entry

    def record_broadcast(self, frame: bytes) -> Stamped:
        now = self._clock()
        stream = self._broadcasts
        stream.seq += 1
        entry = stamp(frame_text(frame), broadcast_event_id(self.epoch, stream.seq), 0, stream.seq,
                      now + self.ttl_s)
        self._keep(stream, entry, now)
        return entry

    def note_queued(self, player_id: str, stamped: Stamped) -> None:
        """The message went to the player's offline queue (see `plan_replay`, empty id);
        the roster's route and requeue steps say so, in the same turn."""
        stamped.queued = True

    def note_taken(self, player_id: str) -> None:
        stream = self._players.get(player_id)
        if stream is not None:
            stream.taken_through = stream.seq

    def replay(self, player_id: str, last_event_id: str) -> Replay:
        self._expire(self._clock())
        stream = self._players.get(player_id)
        player = None if stream is None else PlayerView(
            stream.generation, stream.seq, stream.trimmed_seq, stream.trimmed_after, stream.created_after,
            stream.taken_through, list(stream.entries))
        broadcasts = self._broadcasts
        planned = plan_replay(self.epoch, player, BroadcastView(broadcasts.seq, broadcasts.trimmed_seq,
                                                                list(broadcasts.entries)),
                              last_event_id, self._forgotten_after)
        if stream is not None:
            stream.taken_through = stream.seq
        return planned

    def maintain(self) -> int:
        before = self.given_up
        now = self._clock()
        self._expire(now)
        self._forget_idle(now)
        return self.given_up - before

    def _keep(self, stream: _Stream, entry: Stamped, now: float) -> None:
        self._expire(now)
        size = len(entry) + ENTRY_OVERHEAD_BYTES
        while len(stream.entries) >= self.max_per_stream:
            self._give_up(stream)
        while self.max_total_bytes and self._bytes + size > self.max_total_bytes and self._give_up_oldest():
            pass
        stream.entries.append(entry)
        self._arrivals.append((entry, stream))
        self._size += 1
        self._bytes += size
        self._compact_if_mostly_stale()

    def _expire(self, now: float) -> None:
        """Messages leave in arrival order, which is expiry order (one TTL for all)."""
        arrivals = self._arrivals
        while arrivals and (arrivals[0][0].removed or arrivals[0][0].expires_at <= now):
            entry, stream = arrivals.popleft()
            if entry.removed:
                self._stale_arrivals -= 1
            else:
                self._give_up(stream)  # it is its stream's oldest
                self._stale_arrivals -= 1  # its arrival, counted stale by _give_up, is gone already

    def _give_up_oldest(self) -> bool:
        while self._arrivals:
            entry, stream = self._arrivals.popleft()
            if entry.removed:
                self._stale_arrivals -= 1
                continue
            self._give_up(stream)
            self._stale_arrivals -= 1  # _give_up counted the one popped just now as stale
            return True
        return False

    def _give_up(self, stream: _Stream) -> None:
        entry = stream.entries.popleft()
        entry.removed = True
        stream.trimmed_seq = entry.player_seq or entry.broadcast_seq
        stream.trimmed_after = max(stream.trimmed_after, entry.broadcast_seq)
        self._size -= 1
        self._bytes -= len(entry) + ENTRY_OVERHEAD_BYTES
        self._stale_arrivals += 1
        self.given_up += 1

    def _compact_if_mostly_stale(self) -> None:
        if self._stale_arrivals > max(1024, 2 * self._size):
            self._arrivals = deque(arrival for arrival in self._arrivals if not arrival[0].removed)
            self._stale_arrivals = 0

    def _forget_idle(self, now: float) -> None:
        """Forget empty streams idle past STREAM_RETENTION_S, and the idlest past
        MAX_PLAYER_STREAMS (giving up what they hold)."""
        players = self._players
        while players:
            player_id, stream = next(iter(players.items()))
            over = len(players) > MAX_PLAYER_STREAMS
            if not over and (stream.entries or stream.last_active > now - STREAM_RETENTION_S):
                return
            while stream.entries:
                self._give_up(stream)
            self._forgotten_after = max(self._forgotten_after, stream.trimmed_after)
            del players[player_id]
