"""`Broker` over Redis Streams: envelopes travel between gateway processes and hosts.

Each gateway reads its own stream (`RedisKeys.stream`), which holds what was published
for the players it holds and every broadcast. A publish appends the envelope to the
streams of the gateways the roster named (one script, one round trip), naming the seats
(connections) it was routed to; a broadcast appends it to the stream of every gateway
that reads one (`RedisKeys.streams`).

Why streams and not pub/sub: pub/sub drops whatever is published while a gateway is not
subscribed (Redis restarting, the listener reconnecting), although the publisher was
answered 200. A stream keeps the envelope; the reader asks for everything after the last
id it has seen (`XREAD BLOCK`), so a reconnecting gateway catches up on what was
published meanwhile, in order, each envelope once. Memory stays bounded: the reader trims
what it has read, and each stream holds at most about `-broker-stream-length` envelopes
(`XADD MAXLEN ~`) for a reader that is away; what a reader could not read before it was
trimmed is counted (`lost`). A stream whose reader stopped for good expires
`IDLE_STREAM_KEEP_S` after its last word: long enough to catch up after a partition.

Guarantees: in publish order per publisher, at most once per gateway, and at least once
while Redis keeps the envelope: not when Redis restarts without persistence before the
reader read it, nor past the stream's length. Envelopes stay opaque: the transport
carries `encode(envelope)` as one field and never looks into the frame.

The listener reconnects by itself with capped exponential backoff.

On a Redis Cluster each stream is a key of its own slot (tagged by its gateway), so the
streams spread over the masters and an envelope goes only to the nodes holding the
streams it is appended to, never to every node. A broadcast reads the live readers (one
slot) and appends to their streams, pipelined per node (a single server does both in one
script). Upkeep registers the reader and keeps its stream in two steps (two slots). A
failover is told from a restart by the replication id: the promoted replica carries on
its master's data (its secondary id is the master's), so reading resumes after the last
id read; a node that came back empty has a new one, so its stream is read from the start.
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Callable

import gevent
import gevent.event
import redis

from wsgateway.broker import COUNTED_BROADCAST, Deliver, Envelope  # noqa: F401 (COUNTED_BROADCAST: "b" below)
from wsgateway.redis_link import REDIS_ERRORS, Client, RedisKeys, blocking_twin, broker_errors, is_cluster

log = logging.getLogger(__name__)

RECONNECT_FIRST_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 5.0
READ_BLOCK_S = 1.0  # one XREAD waits at most this long, so the listener checks its link this often
READ_BATCH = 1000  # envelopes taken by one XREAD
UPKEEP_PERIOD_S = 1.0  # the reader re-registers, refreshes its stream's expiry and trims what it read
STREAM_LENGTH = 10_000  # default bound of a stream whose reader is away (-broker-stream-length)
# How long a stream outlives the last word from its reader. Envelopes reach a gateway's
# stream only while its players count as present (up to -presence-ttl after it went
# silent), but a gateway cut off from Redis reads them only when the network heals: its
# stream must outlast the partition, not the presence. The stream of a reader that crashed
# (a clean stop deletes it) lingers this long, holding at most -presence-ttl of traffic
# (and READER_GRACE_S more of broadcasts).
IDLE_STREAM_KEEP_S = 300.0
# On a Redis Cluster a broadcast is answered with the connections of the gateways
# registered as readers when it was counted (`RedisRoster.reach`), then appended to the
# streams of those registered when it is sent, one step later. A registration that ran out
# in between (a gateway cut off from Redis, just as it expires) would have its connections
# counted and the message never sent to them. So a broadcast still goes to a reader whose
# registration ran out less than this ago: longer than any count-to-send gap (two Redis
# round trips, each bounded by -db-timeout); a dead gateway's stream gets this much more,
# and expires. (On a single server count and append are one step: such a reader gets it
# marked for none of its connections, see LUA_COUNTED_BROADCAST.)
READER_GRACE_S = 30.0
READER_GRACE_MS = int(READER_GRACE_S * 1000)


def stream_ttl_ms(member_ttl_s: float) -> int:
    """How long a gateway's stream lives without a word from its reader (see
    `IDLE_STREAM_KEEP_S`): every step that creates one sets this expiry."""
    return max(2 * max(1, int(member_ttl_s * 1000)), int(IDLE_STREAM_KEEP_S * 1000))


_TO_PLAYER = b"P"
_TO_ALL = b"A"
_FIELD = b"e"
_GATEWAYS_FIELD = b"g"  # the other gateways a player envelope went to (when it went to several)
_ID_FIELD = b"i"  # the message's id, when the gateways keep a history (history_redis writes it too)
_SEATS_FIELD = b"s"  # the seats a player envelope was routed to, "\n"-joined (history_redis writes it too)
_LIVE_ONLY_FIELD = b"l"  # present (b"1") on an envelope for live connections only
_REROUTED_BY_FIELD = b"r"  # on a copy routed again: the gateway that routed it again (Envelope.rerouted_by)
# What a gateway's broadcast count does at this point of its stream (single server only),
# so that the reader knows, entry by entry, exactly which of its connections a broadcast
# was counted for: "0" (the stream was created: Redis counts none of this gateway's
# connections, e.g. after it lost its data), "+seat\nplayer" / "-seat\nplayer" (a seat
# counted / no longer counted, `RedisRoster.take_seat` / `leave`), "=N" (the heartbeat
# numbered N set the count to the seats this process held, `RedisRoster.counted_at`),
# and on a broadcast whose count was taken in the step that appended it, "b": for exactly
# the seats counted at that point, or "n": for none (see LUA_COUNTED_BROADCAST).
_COUNT_FIELD = b"c"

# Append `fields` (a Lua list) to a gateway's stream. A stream that does not exist (its
# reader not yet back after Redis lost it, or never written) is created with an expiry,
# so nobody's stream lives for ever, and starts with the "0" count entry (see _COUNT_FIELD).
LUA_STREAM_APPEND = """
local function stream_append(stream, max_length, ttl_ms, fields)
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', max_length, '*', 'c', '0')
    redis.call('PEXPIRE', stream, ttl_ms)
  end
  redis.call('XADD', stream, 'MAXLEN', '~', max_length, '*', unpack(fields))
end
"""

# The connections of live gateways (forgetting the counters of dead ones).
LUA_LIVE_CONNECTIONS = """
local function live_connections(gateways, counters)
  local dead = redis.call('ZRANGEBYSCORE', gateways, '-inf', now)
  for _, gateway in ipairs(dead) do redis.call('HDEL', counters, gateway) end
  redis.call('ZREMRANGEBYSCORE', gateways, '-inf', now)
  local total = 0
  for _, gateway in ipairs(redis.call('ZRANGE', gateways, 0, -1)) do
    total = total + (tonumber(redis.call('HGET', counters, gateway)) or 0)
  end
  return total
end
"""

# Count a broadcast's reach and append it, in one step (a single server): the answer adds up
# the connection counts of every live gateway (heartbeating) that reads its stream
# (registered), and the entry appended to each of those says "b" (count field): its gateway
# sends it to exactly the seats its stream says were counted at that point. A gateway
# registered but not counted (not heartbeating yet after Redis lost its data, or whose
# registration ran out less than the grace ago, see READER_GRACE_S) gets it marked "n": for
# none of its connections. KEYS and ARGV positions are the caller's: registry, gateways,
# counters; stream prefix, max length, stream ttl ms, wire form, reader grace ms, and more
# fields for every entry (a Lua list).
LUA_COUNTED_BROADCAST = LUA_LIVE_CONNECTIONS + LUA_STREAM_APPEND + """
local function counted_broadcast(registry, gateways, counters, stream_prefix, max_length, ttl_ms, wire, grace_ms,
                                 more_fields)
  redis.call('ZREMRANGEBYSCORE', registry, '-inf', now - tonumber(grace_ms))
  live_connections(gateways, counters)
  local total = 0
  for _, gateway in ipairs(redis.call('ZRANGE', registry, 0, -1)) do
    local reading_until = tonumber(redis.call('ZSCORE', registry, gateway))
    local counted = reading_until > now and redis.call('ZSCORE', gateways, gateway)
    if counted then total = total + (tonumber(redis.call('HGET', counters, gateway)) or 0) end
    local fields = {'e', wire, 'c', counted and 'b' or 'n'}
    for _, field in ipairs(more_fields) do fields[#fields + 1] = field end
    stream_append(stream_prefix .. gateway, max_length, ttl_ms, fields)
  end
  return total
end
"""

# KEYS: the streams. ARGV: max length, stream ttl ms, wire form, the gateways it goes to
# ('' when only one), the message's id ('' without history), the seats it goes to ('' for
# none named), '1' for live connections only (else ''), the gateway that routed it again ('' for
# a message routed once). For a stream that does not exist
# (its reader not yet back after Redis lost it, or gone): created as LUA_STREAM_APPEND does.
CREATE_AND_PUBLISH = LUA_STREAM_APPEND + """
local fields = {'e', ARGV[3]}
if ARGV[4] ~= '' then table.insert(fields, 'g') table.insert(fields, ARGV[4]) end
if ARGV[5] ~= '' then table.insert(fields, 'i') table.insert(fields, ARGV[5]) end
if ARGV[6] ~= '' then table.insert(fields, 's') table.insert(fields, ARGV[6]) end
if ARGV[7] ~= '' then table.insert(fields, 'l') table.insert(fields, ARGV[7]) end
if ARGV[8] ~= '' then table.insert(fields, 'r') table.insert(fields, ARGV[8]) end
for _, stream in ipairs(KEYS) do
  stream_append(stream, ARGV[1], ARGV[2], fields)
end
"""

_LUA_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The readers a broadcast goes to: those registered, and those whose registration ran out
# less than `grace_ms` ago (see READER_GRACE_S); older ones are forgotten.
_LUA_LIVE_READERS = """
local function live_readers(registry, grace_ms)
  redis.call('ZREMRANGEBYSCORE', registry, '-inf', now - tonumber(grace_ms))
  return redis.call('ZRANGE', registry, 0, -1)
end
"""

# KEYS: the readers' registry, gateways, gateway connections. ARGV: stream-key prefix, max
# length, stream ttl ms, wire form, reader grace ms. Returns the connections it was counted
# for (LUA_COUNTED_BROADCAST). A single server only: the streams are keys of other slots
# on a cluster (see READERS).
BROADCAST = _LUA_NOW_MS + LUA_COUNTED_BROADCAST + """
return counted_broadcast(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], {})
"""

# KEYS: the readers' registry. ARGV: reader grace ms. Returns the gateways a broadcast goes
# to (a cluster's broadcast).
READERS = _LUA_NOW_MS + _LUA_LIVE_READERS + """
return live_readers(KEYS[1], ARGV[1])
"""

# Register a reader for broadcasts (1 when it was not registered: Redis lost it); keep its
# stream alive and drop what it has read.
_LUA_UPKEEP = """
local function register(registry, gateway, ttl_ms)
  return redis.call('ZADD', registry, now + tonumber(ttl_ms), gateway)
end
local function keep(stream, ttl_ms, last_read)
  if redis.call('EXISTS', stream) == 1 then
    redis.call('PEXPIRE', stream, ttl_ms)
    if last_read ~= '' then redis.call('XTRIM', stream, 'MINID', '~', last_read) end
  end
end
"""

# KEYS: the readers' registry, this reader's stream. ARGV: gateway, registration ttl ms,
# the last id read ('' for none yet), stream ttl ms. Both at once (a single server).
UPKEEP = _LUA_NOW_MS + _LUA_UPKEEP + """
local missing = register(KEYS[1], ARGV[1], ARGV[2])
keep(KEYS[2], ARGV[4], ARGV[3])
return missing
"""

# The same in two steps, for a cluster (the registry and the stream are in two slots).
# KEYS: the readers' registry. ARGV: gateway, registration ttl ms.
REGISTER = _LUA_NOW_MS + _LUA_UPKEEP + """
return register(KEYS[1], ARGV[1], ARGV[2])
"""
# KEYS: this reader's stream. ARGV: its ttl ms, the last id read ('' for none yet).
KEEP_STREAM = _LUA_NOW_MS + _LUA_UPKEEP + """
keep(KEYS[1], ARGV[1], ARGV[2])
"""


def encode(envelope: Envelope) -> bytes:
    """Wire form: `A` + frame, or `P` + 2-byte length + player id + frame."""
    if envelope.player_id is None:
        return _TO_ALL + envelope.frame
    player = envelope.player_id.encode("utf-8", "surrogatepass")
    return _TO_PLAYER + struct.pack("!H", len(player)) + player + envelope.frame


def decode(data: bytes) -> Envelope:
    if data[:1] == _TO_ALL:
        return Envelope(data[1:])
    (length,) = struct.unpack_from("!H", data, 1)
    return Envelope(data[3 + length:], data[3:3 + length].decode("utf-8", "surrogatepass"))


def _stream_id(raw: bytes) -> tuple[int, int]:
    milliseconds, _, sequence = raw.partition(b"-")
    return int(milliseconds), int(sequence or 0)


class RedisBroker:
    """Carries envelopes between gateways through one Redis stream per gateway."""

    def __init__(self, client: Client, keys: RedisKeys, gateway_id: str, *,
                 stream_length: int = STREAM_LENGTH, member_ttl_s: float = 15.0,
                 on_subscribed: Callable[[], None] | None = None,
                 on_lost: Callable[[int], None] | None = None) -> None:
        """`member_ttl_s`: how long this gateway stays registered for broadcasts without a
        word from it (the roster's presence TTL: as long as its players count as present,
        what is sent to them waits in its stream; the stream itself is kept longer, see
        `IDLE_STREAM_KEEP_S`).
        `on_subscribed` runs (in its own greenlet) after every (re)connection, and when
        an upkeep finds this reader's registration gone: Redis may have restarted, been
        flushed or evicted keys, and lost what this gateway wrote there. `on_lost(count)`: envelopes
        trimmed from this gateway's stream before it could read them."""
        self.gateway_id = gateway_id
        self.lost = 0  # envelopes trimmed from this gateway's stream before it read them
        self._client = client
        self._cluster = is_cluster(client)
        self._reader = blocking_twin(client, READ_BLOCK_S)
        self._keys = keys
        self._stream = keys.stream(gateway_id)
        self._stream_prefix = keys.stream("")
        self._stream_length = stream_length
        self._member_ttl_ms = max(1, int(member_ttl_s * 1000))
        self._stream_ttl_ms = stream_ttl_ms(member_ttl_s)
        self._on_subscribed = on_subscribed
        self._on_lost = on_lost
        self._create_and_publish = client.register_script(CREATE_AND_PUBLISH)
        self._broadcast = client.register_script(BROADCAST)
        self._upkeep = client.register_script(UPKEEP)
        self._readers = client.register_script(READERS)
        self._register = client.register_script(REGISTER)
        self._keep_stream = client.register_script(KEEP_STREAM)
        self._deliver: Deliver | None = None
        self._listener: gevent.Greenlet | None = None
        self._subscribed = gevent.event.Event()
        self._closed = False
        # Where reading resumes: the last id read from the stream of the Redis run `_run_id`
        # (on a cluster: of the data set with that replication id).
        self._last_id = b"0-0"
        self._run_id: str | None = None
        self._read_count = 0  # envelopes read from the current stream, to tell what was trimmed unread

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._listener = gevent.spawn(self._listen_forever)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Block until the listener is registered (start-up), at most `timeout_s`."""
        return self._subscribed.wait(timeout_s)

    @property
    def counts_broadcasts(self) -> bool:
        """On a single server a broadcast is counted in the step that appends it; a
        cluster's spans slots, so the roster's reach is taken before it (see `Broker`)."""
        return not self._cluster

    def publish(self, envelope: Envelope) -> int | None:
        data = encode(envelope)
        with broker_errors("publish"):
            if envelope.gateways is not None:
                gateways = sorted(envelope.gateways)
                fields = {_FIELD: data}
                if envelope.event_id:
                    fields[_ID_FIELD] = envelope.event_id.encode()
                if len(gateways) > 1:
                    fields[_GATEWAYS_FIELD] = "\n".join(gateways).encode()
                if envelope.seats:
                    fields[_SEATS_FIELD] = "\n".join(sorted(envelope.seats)).encode()
                if envelope.live_only:
                    fields[_LIVE_ONLY_FIELD] = b"1"
                if envelope.rerouted_by:
                    fields[_REROUTED_BY_FIELD] = envelope.rerouted_by.encode("utf-8", "surrogatepass")
                self._append([self._keys.stream(gateway) for gateway in gateways], fields)
            elif self._cluster:
                readers = [reader.decode() for reader in self._readers(keys=[self._keys.streams],
                                                                       args=[READER_GRACE_MS])]
                self._append([self._keys.stream(reader) for reader in readers], {_FIELD: data})
            else:
                return int(self._broadcast(keys=[self._keys.streams, self._keys.gateways,
                                                 self._keys.gateway_connections],
                                           args=[self._stream_prefix, self._stream_length, self._stream_ttl_ms, data,
                                                 READER_GRACE_MS]))
        return None

    def _append(self, streams: list[str], fields: dict[bytes, bytes]) -> None:
        """One plain XADD per stream (NOMKSTREAM: no stream is made without an expiry);
        the rare stream that does not exist is created by a script, with its expiry (on a
        cluster one script per stream: each is in a slot of its own)."""
        if not streams:
            return
        if len(streams) == 1:
            added = [self._client.xadd(streams[0], fields, maxlen=self._stream_length, nomkstream=True)]
        else:
            pipeline = self._client.pipeline(transaction=False)
            for stream in streams:
                pipeline.xadd(stream, fields, maxlen=self._stream_length, nomkstream=True)
            added = pipeline.execute()
        missing = [stream for stream, entry_id in zip(streams, added) if entry_id is None]
        if missing:
            args = [self._stream_length, self._stream_ttl_ms, fields[_FIELD], fields.get(_GATEWAYS_FIELD, b""),
                    fields.get(_ID_FIELD, b""), fields.get(_SEATS_FIELD, b""),
                    fields.get(_LIVE_ONLY_FIELD, b""), fields.get(_REROUTED_BY_FIELD, b"")]
            for keys in ([stream] for stream in missing) if self._cluster else [missing]:
                self._create_and_publish(keys=keys, args=args)

    def state(self) -> str:
        return "ok" if self._subscribed.is_set() else "reconnecting"

    def close(self) -> None:
        """Stop reading and take this gateway's stream and registration out of Redis."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.kill(block=False)
        try:
            pipeline = self._client.pipeline(transaction=False)
            pipeline.zrem(self._keys.streams, self.gateway_id)
            pipeline.delete(self._stream)
            pipeline.execute()
        except REDIS_ERRORS:
            pass  # both expire by themselves

    def _listen_forever(self) -> None:
        delay_s = RECONNECT_FIRST_DELAY_S
        while not self._closed:
            try:
                self._listen_once()
            except (*REDIS_ERRORS, OSError) as exc:
                self._subscribed.clear()
                log.warning("redis stream reader lost its link, reconnecting",
                            extra={"event": "broker_reconnecting", "delay_s": delay_s, "detail": str(exc)})
                gevent.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_MAX_DELAY_S)
            else:
                delay_s = RECONNECT_FIRST_DELAY_S

    def _listen_once(self) -> None:
        self._resume_point()
        self._upkeep_now()
        # What was sent here while away goes out before `on_subscribed` writes presence
        # back: that hands over what was queued for the same players later, once their
        # presence expired (a partition longer than -presence-ttl), and must come after.
        while self._read(block_ms=None) == READ_BATCH:
            pass
        self._subscribed.set()
        log.info("reading redis stream", extra={"event": "broker_subscribed", "gateway": self.gateway_id})
        if self._on_subscribed is not None:
            gevent.spawn(self._on_subscribed)
        next_upkeep_at = time.monotonic() + UPKEEP_PERIOD_S
        while not self._closed:
            self._read(block_ms=int(READ_BLOCK_S * 1000))
            if time.monotonic() >= next_upkeep_at:
                if self._upkeep_now() and self._on_subscribed is not None:
                    # Redis lost the registration (FLUSHALL, eviction) without dropping the
                    # link: broadcasts reach this gateway again from now on, so its presence
                    # (and connection count, a broadcast's reach) is written back at once.
                    gevent.spawn(self._on_subscribed)
                next_upkeep_at = time.monotonic() + UPKEEP_PERIOD_S

    def _read(self, block_ms: int | None) -> int:
        """Hand over the next entries of this gateway's stream (waiting up to `block_ms`
        for one; None: not at all); return how many there were."""
        reply = self._reader.xread({self._stream: self._last_id}, count=READ_BATCH, block=block_ms)
        count = 0
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last_id = entry_id
                self._read_count += 1
                count += 1
                self._hand_over(entry_id, fields)
        return count

    def _hand_over(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver one entry; a player envelope names the gateways and the seats it was
        sent to, so that delivery knows which connections it is for, and who else holds
        the player (see `Delivery`)."""
        if self._deliver is None:
            return
        data = fields.get(_FIELD)
        count = fields.get(_COUNT_FIELD)
        if data is None:
            if count is not None:  # a change of what this gateway's broadcast count holds
                self._deliver(Envelope(b"", count_change=count.decode("utf-8", "surrogatepass")))
            return
        envelope = decode(data)
        event_id = fields.get(_ID_FIELD)
        if event_id is not None:
            envelope = envelope._replace(event_id=event_id.decode("ascii", "replace"))
        if envelope.player_id is not None:
            gateways, seats = fields.get(_GATEWAYS_FIELD), fields.get(_SEATS_FIELD)
            envelope = envelope._replace(gateways=frozenset(gateways.decode().split("\n")) if gateways
                                         else frozenset((self.gateway_id,)), sent_at_ms=_stream_id(entry_id)[0],
                                         seats=frozenset(seats.decode().split("\n")) if seats else None,
                                         live_only=_LIVE_ONLY_FIELD in fields,
                                         rerouted_by=fields.get(_REROUTED_BY_FIELD, b"").decode("utf-8",
                                                                                             "surrogatepass"))
        else:
            envelope = envelope._replace(sent_at_ms=_stream_id(entry_id)[0],
                                         count_change=count.decode() if count is not None else "")
        try:
            self._deliver(envelope)
        except Exception:
            log.exception("delivering a broker message failed", extra={"event": "delivery_failed"})

    def _upkeep_now(self) -> bool:
        """Register as a reader, keep the stream; True when the registration was missing."""
        last = self._last_id if self._last_id != b"0-0" else b""
        if self._cluster:
            missing = self._register(keys=[self._keys.streams], args=[self.gateway_id, self._member_ttl_ms],
                                     client=self._reader)
            self._keep_stream(keys=[self._stream], args=[self._stream_ttl_ms, last], client=self._reader)
            return bool(missing)
        return bool(self._upkeep(keys=[self._keys.streams, self._stream],
                                 args=[self.gateway_id, self._member_ttl_ms, last, self._stream_ttl_ms],
                                 client=self._reader))

    def _same_data(self) -> bool:
        """Whether the node holding this gateway's stream still has the data read so far
        (and remember what it has now). A single server: the same run id. A cluster: the
        same replication id, or the master's one a promoted replica keeps as secondary."""
        if not self._cluster:
            run_id = self._reader.info("server").get("run_id")
            same, self._run_id = run_id == self._run_id, run_id
            return same
        node = self._reader.get_node_from_key(self._stream)
        replication = self._reader.info("replication", target_nodes=node)
        same = self._run_id in (replication.get("master_replid"), replication.get("master_replid2"))
        self._run_id = replication.get("master_replid")
        return same

    def _resume_point(self) -> None:
        """Where to read from after (re)connecting: after the last id read, unless Redis
        restarted (a new run id: its stream is new, and everything in it is unread).
        Envelopes trimmed away before this gateway read them are counted as lost."""
        first_time = self._run_id is None
        if not self._same_data():
            if not first_time:
                log.warning("redis restarted: reading this gateway's stream from its start",
                            extra={"event": "broker_redis_restarted", "gateway": self.gateway_id})
            self._last_id, self._read_count = b"0-0", 0
            return
        try:
            info = self._reader.xinfo_stream(self._stream)
        except redis.ResponseError:  # no stream: nothing was sent to us while we were away
            return
        first = info.get("first-entry")
        if first is None or _stream_id(first[0]) <= _stream_id(self._last_id):
            return  # the entry after the last one read is still there
        lost = int(info.get("entries-added", 0)) - self._read_count - int(info.get("length", 0))
        if lost > 0:
            self.lost += lost
            self._read_count += lost
            log.warning("envelopes trimmed from this gateway's stream before it read them",
                        extra={"event": "broker_stream_overflow", "gateway": self.gateway_id, "lost": lost})
            if self._on_lost is not None:
                self._on_lost(lost)
