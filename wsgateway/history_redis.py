"""The history in Redis (with -broker): ids per player across the cluster, and resuming
on any gateway.

The rules are `history`'s; this module keeps the same streams in Redis, each step one
Lua script on Redis's clock:

* a message to a player gets its id in the roster's route step (`HistoryRoster`): one
  script runs `roster_redis.ROUTE_BODY` (live or queued), then keeps the message in the
  player's stream and, when it goes live, appends it with its id to the streams of the
  gateways that hold the player. Id, history and stream order are decided in one atomic
  step, so what each gateway reads is in the order the ids say (a broadcast between two
  messages is between them everywhere);
* a broadcast to all (`RedisHistory.record_broadcast`) is kept once, in the broadcast
  stream, and appended to every gateway's stream in the same script: one Redis write for
  its history, however many players there are;
* a replay reads a player's stream and the broadcast stream in one script.

Keys (`RedisKeys`): per player a LIST of items `expiry_ms:size:seq:after:queued:json`
and a HASH of its state (`gen`, `seq`, `trimmed`, `after`, `created`, `taken`); the
broadcast stream's LIST (items `expiry_ms:size:seq:json`) and HASH (`seq`, `trimmed`,
`generations`); the epoch, made from Redis's clock when it is missing, so a Redis that
lost its data (restart without persistence, FLUSHALL) starts a new epoch and older ids
are answered `history_lost`. All streams together are bounded by -max-history-bytes,
accounted like the offline queues (a ZSET of every stream's oldest item, a HASH of sizes
whose field "" is the total); the oldest item of any stream goes first.

Limits: a player's state HASH lives `STREAM_RETENTION_S` past its last message (then the
stream starts a new generation); a broadcast id resumed after that is answered from what
is kept without knowing what the forgotten stream gave up. While Redis is out of reach,
publishing answers 503 as without history (a local-only delivery carries no id).
"""
from __future__ import annotations

import redis

from wsgateway.broker import Envelope
from wsgateway.broker_redis import LUA_COUNTED_BROADCAST, LUA_STREAM_APPEND, READER_GRACE_MS, encode
from wsgateway.history import (ENTRY_OVERHEAD_BYTES, STREAM_RETENTION_S, BroadcastView, PlayerView, Replay, Stamped,
                               broadcast_event_id, frame_text, plan_replay, player_event_id, stamp)
from wsgateway.redis_link import RedisKeys, broker_errors
from wsgateway.roster import Route
from wsgateway.roster_redis import REQUEUE_BODY, ROUTE_BODY, ROUTE_PREAMBLE, RedisRoster

SWEEP_STREAMS = 200  # streams whose expired items one maintenance step gives up, at most

# Shared by every history script. Reads the history's KEYS and ARGV from HK/HA, which each
# script sets up first (`_settings`). Needs `now` (ms).
_LUA_HISTORY = """
local function history_epoch()
  local epoch = redis.call('GET', HK.epoch)
  if not epoch then
    local clock = redis.call('TIME')
    epoch = string.format('%x', tonumber(clock[1]) * 1000000 + tonumber(clock[2]))
    redis.call('SET', HK.epoch, epoch)
  end
  return epoch
end
local function history_item_fields(item, count)
  local fields, start = {}, 1
  for index = 1, count do
    local colon = string.find(item, ':', start, true)
    fields[index] = string.sub(item, start, colon - 1)
    start = colon + 1
  end
  fields[count + 1] = string.sub(item, start)
  return fields
end
local function history_meta_of(list)
  if list == HK.blist then return HK.bmeta end
  return HA.meta_prefix .. string.sub(list, string.len(HA.list_prefix) + 1)
end
local function history_note_head(list)
  local head = redis.call('LINDEX', list, 0)
  if head then
    redis.call('ZADD', HK.heads, tonumber(history_item_fields(head, 1)[1]), list)
  else
    redis.call('ZREM', HK.heads, list)
  end
end
local function history_resize(list, delta)
  if redis.call('HINCRBY', HK.sizes, list, delta) <= 0 then redis.call('HDEL', HK.sizes, list) end
  if redis.call('HINCRBY', HK.sizes, '', delta) <= 0 then redis.call('HDEL', HK.sizes, '') end
end
-- give up the oldest item of `list`; false when the list was gone (its accounts are dropped)
local function history_give_up(list)
  local item = redis.call('LPOP', list)
  if not item then
    history_resize(list, -(tonumber(redis.call('HGET', HK.sizes, list)) or 0))
    redis.call('ZREM', HK.heads, list)
    return false
  end
  local fields = history_item_fields(item, 4)
  history_resize(list, -tonumber(fields[2]))
  local meta = history_meta_of(list)
  if list == HK.blist then
    redis.call('HSET', meta, 'trimmed', fields[3])
  else
    redis.call('HSET', meta, 'trimmed', fields[3], 'after', fields[4])
  end
  history_note_head(list)
  return true
end
local function history_expire(list)
  local given_up = 0
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head or tonumber(history_item_fields(head, 1)[1]) > now then return given_up end
    history_give_up(list)
    given_up = given_up + 1
  end
end
-- keep `item` (of `size` accounted bytes) at the end of `list`, within every bound
local function history_keep(list, item, size)
  history_expire(list)
  while redis.call('LLEN', list) >= HA.size do history_give_up(list) end
  while HA.max_bytes > 0 and (tonumber(redis.call('HGET', HK.sizes, '')) or 0) + size > HA.max_bytes do
    local oldest = redis.call('ZRANGE', HK.heads, 0, 0)[1]
    if not oldest then redis.call('HDEL', HK.sizes, '') break end
    history_give_up(oldest)
  end
  redis.call('RPUSH', list, item)
  history_resize(list, size)
  if redis.call('LLEN', list) == 1 then history_note_head(list) end
  redis.call('PEXPIRE', list, 2 * HA.ttl + 60000)  -- a backstop: items expire long before
end
local function history_size_of(json, id)
  return string.len(json) + string.len(id) + 8 + HA.overhead
end
local function history_broadcast_seq()
  return tonumber(redis.call('HGET', HK.bmeta, 'seq')) or 0
end
-- keep a message to a player; its id
local function history_record_player(list, meta, json, queued)
  local epoch, after = history_epoch(), history_broadcast_seq()
  if redis.call('EXISTS', meta) == 0 then
    local generation = redis.call('HINCRBY', HK.bmeta, 'generations', 1)
    redis.call('HSET', meta, 'gen', string.format('%x', generation), 'seq', 0, 'trimmed', 0, 'after', -1,
               'created', after, 'taken', 0)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local id = epoch .. '.' .. redis.call('HGET', meta, 'gen') .. '.' .. seq .. '.' .. after
  local size = history_size_of(json, id)
  history_keep(list, string.format('%d:%d:%d:%d:%d:', now + HA.ttl, size, seq, after, queued) .. json, size)
  redis.call('PEXPIRE', meta, HA.retention)
  return id
end
"""


def _settings(keys_at: int, args_at: int) -> str:
    """Lua that names the history's KEYS (5, from `keys_at`) and ARGV (7, from `args_at`)."""
    return f"""
local HK = {{epoch = KEYS[{keys_at}], bmeta = KEYS[{keys_at + 1}], blist = KEYS[{keys_at + 2}],
            heads = KEYS[{keys_at + 3}], sizes = KEYS[{keys_at + 4}]}}
local HA = {{size = tonumber(ARGV[{args_at}]), ttl = tonumber(ARGV[{args_at + 1}]),
            max_bytes = tonumber(ARGV[{args_at + 2}]), overhead = tonumber(ARGV[{args_at + 3}]),
            retention = tonumber(ARGV[{args_at + 4}]), list_prefix = ARGV[{args_at + 5}],
            meta_prefix = ARGV[{args_at + 6}]}}
"""


# Appends `id` to every gateway's stream named in `gateways` (a Lua list), as the broker does,
# naming the `seats` it goes to (a Lua list; nil for a broadcast), and whether it is for
# live connections only (never queued when its connection is gone).
_LUA_SEND = LUA_STREAM_APPEND + """
local function history_send(gateways, stream_prefix, max_length, stream_ttl, wire, id, seats, live_only)
  table.sort(gateways)
  local fields = {'e', wire, 'i', id}
  if #gateways > 1 then
    table.insert(fields, 'g')
    table.insert(fields, table.concat(gateways, '\\n'))
  end
  if seats then
    table.sort(seats)
    table.insert(fields, 's')
    table.insert(fields, table.concat(seats, '\\n'))
  end
  if live_only then
    table.insert(fields, 'l')
    table.insert(fields, '1')
  end
  for _, gateway in ipairs(gateways) do
    stream_append(stream_prefix .. gateway, max_length, stream_ttl, fields)
  end
end
"""

# KEYS: ROUTE's 7, then the history's 5 (8..12), the player's meta and list (13, 14).
# ARGV: ROUTE's 9, then the history's 7 (10..16), then json, stream prefix, stream length,
# stream ttl ms, wire form (17..21). Returns ROUTE's reply with the message's id appended.
HISTORY_ROUTE = ROUTE_PREAMBLE + _settings(8, 10) + _LUA_HISTORY + _LUA_SEND + """
local function route()
""" + ROUTE_BODY + """
end
local reply = route()
local queued = (tonumber(reply[1]) == 1 and tonumber(reply[2]) == 1) and 1 or 0
local id = history_record_player(KEYS[14], KEYS[13], ARGV[17], queued)
if tonumber(reply[1]) == 0 and #reply > 3 then
  local gateways, seen, seats = {}, {}, {}
  for index = 4, #reply do
    seats[#seats + 1] = reply[index]
    local gateway = string.match(reply[index], '^(.*)/[^/]*$')
    if not seen[gateway] then
      seen[gateway] = true
      gateways[#gateways + 1] = gateway
    end
  end
  history_send(gateways, ARGV[18], ARGV[19], ARGV[20], ARGV[21], id, seats, ARGV[2] == '0')
end
reply[#reply + 1] = id
return reply
"""

_LUA_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: the history's 5, the readers' registry, gateways, gateway connections (6..8). ARGV:
# the history's 7, json, stream prefix, stream length, stream ttl ms, wire form (8..12),
# reader grace ms (13, see broker_redis.READER_GRACE_S). Counted and appended in this one
# step (broker_redis.LUA_COUNTED_BROADCAST). Returns {connections counted, id}.
BROADCAST = _LUA_NOW_MS + _settings(1, 1) + _LUA_HISTORY + LUA_COUNTED_BROADCAST + """
local epoch = history_epoch()
local seq = redis.call('HINCRBY', HK.bmeta, 'seq', 1)
local id = epoch .. '.' .. seq
local size = history_size_of(ARGV[8], id)
history_keep(HK.blist, string.format('%d:%d:%d:', now + HA.ttl, size, seq) .. ARGV[8], size)
local counted = counted_broadcast(KEYS[6], KEYS[7], KEYS[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13],
                                  {'i', id})
return {counted, id}
"""

# KEYS: the history's 5, the player's meta and list (6, 7). ARGV: the history's 7.
# Returns {epoch, {broadcast seq, trimmed}, {player state...} or {}, player items, broadcast
# items}; the player's queued items count as taken from now on.
REPLAY = _LUA_NOW_MS + _settings(1, 1) + _LUA_HISTORY + """
local epoch = history_epoch()
history_expire(HK.blist)
history_expire(KEYS[7])
local state = redis.call('HMGET', KEYS[6], 'gen', 'seq', 'trimmed', 'after', 'created', 'taken')
if state[1] then
  redis.call('HSET', KEYS[6], 'taken', state[2])
else
  state = {}
end
local broadcasts = redis.call('HMGET', HK.bmeta, 'seq', 'trimmed')
return {epoch, {broadcasts[1] or '0', broadcasts[2] or '0'}, state, redis.call('LRANGE', KEYS[7], 0, -1),
        redis.call('LRANGE', HK.blist, 0, -1)}
"""

# KEYS: the player's meta. A connection without ids took the offline backlog.
TAKEN = """
local seq = redis.call('HGET', KEYS[1], 'seq')
if seq then redis.call('HSET', KEYS[1], 'taken', seq) end
"""

# A Lua function: marks the kept message `seq_text` of the player's list `list` as queued
# (routed live, its connection closed, and it went to the queue), looking at `most` items.
_LUA_NOTE_QUEUED = """
local function note_queued(list, seq_text, most)
  for index = -1, -tonumber(most), -1 do
    local item = redis.call('LINDEX', list, index)
    if not item then return 0 end
    local start = 1
    local colons = {}
    for field = 1, 5 do
      colons[field] = string.find(item, ':', start, true)
      start = colons[field] + 1
    end
    local seq = string.sub(item, colons[2] + 1, colons[3] - 1)
    if seq == seq_text then
      redis.call('LSET', list, index, string.sub(item, 1, colons[4]) .. '1' .. string.sub(item, colons[5]))
      return 1
    end
    if tonumber(seq) < tonumber(seq_text) then return 0 end
  end
  return 0
end
"""

# KEYS and ARGV: roster_redis.REQUEUE's, then the player's list (KEYS 8) and the message's
# seq and the most items to look at (ARGV 13, 14). Routes the copy again as REQUEUE does
# and, when it goes to the queue, marks it queued in the same step: a resume with an empty
# id between the two would otherwise take the queue without it and replay past it.
HISTORY_REQUEUE = ROUTE_PREAMBLE + _LUA_NOTE_QUEUED + """
local function requeue()
""" + REQUEUE_BODY + """
end
local reply = requeue()
if tonumber(reply[1]) == 1 and tonumber(reply[2]) == 1 then note_queued(KEYS[8], ARGV[13], ARGV[14]) end
return reply
"""

# KEYS: the history's 5. ARGV: the history's 7, streams at most (8). Gives up expired
# items of the streams whose oldest expired; returns how many.
SWEEP = _LUA_NOW_MS + _settings(1, 1) + _LUA_HISTORY + """
local given_up = 0
for _, list in ipairs(redis.call('ZRANGEBYSCORE', HK.heads, '-inf', now, 'LIMIT', 0, tonumber(ARGV[8]))) do
  local before = given_up
  given_up = given_up + history_expire(list)
  if given_up == before then  -- a stale head: the list is gone (its backstop expiry), or moved on
    if redis.call('EXISTS', list) == 0 then history_give_up(list) else history_note_head(list) end
  end
end
return given_up
"""


class RedisHistory:
    """`History` shared by every gateway of the cluster, in Redis."""

    sends = True  # record_broadcast appends the broadcast to every gateway's stream itself

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, max_per_stream: int, ttl_s: float,
                 max_total_bytes: int, stream_length: int, stream_ttl_s: float) -> None:
        """`stream_length`, `stream_ttl_s`: the broker's (-broker-stream-length, twice
        -presence-ttl), for the streams this history appends broadcasts to."""
        self._client = client
        self._keys = keys
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.max_per_stream = max_per_stream
        self._stream_length = stream_length
        self._stream_ttl_ms = max(1, int(stream_ttl_s * 1000))
        retention_ms = max(int(STREAM_RETENTION_S * 1000), 2 * self._ttl_ms + 120_000)
        self.settings_keys = [keys.history_epoch, keys.history_broadcast_meta, keys.history_broadcasts,
                              keys.history_heads, keys.history_sizes]
        self.settings_args = [max_per_stream, self._ttl_ms, max_total_bytes, ENTRY_OVERHEAD_BYTES, retention_ms,
                              keys.history(""), keys.history_meta("")]
        self._broadcast = client.register_script(BROADCAST)
        self._replay = client.register_script(REPLAY)
        self._taken = client.register_script(TAKEN)
        self._sweep = client.register_script(SWEEP)

    def stream_args(self, envelope: Envelope) -> list[object]:
        """ARGV the scripts that send take after the message's json: where the gateways'
        streams are, their bounds, and the envelope's wire form."""
        return [self._keys.stream(""), self._stream_length, self._stream_ttl_ms, encode(envelope)]

    def record_broadcast(self, frame: bytes) -> Stamped | None:
        self.send_broadcast(frame)
        return None  # each gateway builds the stamped frame from the id it reads

    def send_broadcast(self, frame: bytes) -> int:
        """Keep the broadcast, count its reach and append it to the streams of the gateways
        counted, in one step; return the connections it was counted for."""
        envelope = Envelope(frame)
        with broker_errors("broadcast"):
            counted, _ = self._broadcast(
                keys=[*self.settings_keys, self._keys.streams, self._keys.gateways, self._keys.gateway_connections],
                args=[*self.settings_args, frame_text(frame), *self.stream_args(envelope), READER_GRACE_MS])
        return int(counted)

    def note_taken(self, player_id: str) -> None:
        with broker_errors("history"):
            self._taken(keys=[self._keys.history_meta(player_id)])

    def replay(self, player_id: str, last_event_id: str) -> Replay:
        with broker_errors("replay"):
            epoch, (broadcast_seq, broadcast_trimmed), state, own, broadcasts = self._replay(
                keys=[*self.settings_keys, self._keys.history_meta(player_id), self._keys.history(player_id)],
                args=self.settings_args)
        epoch = epoch.decode()
        player = None
        if state:
            generation, seq, trimmed, after, created, taken = (value.decode() for value in state)
            player = PlayerView(generation, int(seq), int(trimmed), int(after), int(created), int(taken),
                                [_player_entry(epoch, generation, item) for item in own])
        return plan_replay(epoch, player, BroadcastView(int(broadcast_seq), int(broadcast_trimmed),
                                                        [_broadcast_entry(epoch, item) for item in broadcasts]),
                           last_event_id)

    def maintain(self) -> int:
        with broker_errors("history sweep"):
            return int(self._sweep(keys=self.settings_keys, args=[*self.settings_args, SWEEP_STREAMS]))


def _player_entry(epoch: str, generation: str, item: bytes) -> Stamped:
    _expiry, _size, seq, after, queued, json = item.split(b":", 5)
    entry = stamp(json, player_event_id(epoch, generation, int(seq), int(after)), int(seq), int(after))
    entry.queued = queued == b"1"
    return entry


def _broadcast_entry(epoch: str, item: bytes) -> Stamped:
    _expiry, _size, seq, json = item.split(b":", 3)
    return stamp(json, broadcast_event_id(epoch, int(seq)), 0, int(seq))


class HistoryRoster(RedisRoster):
    """`RedisRoster` whose route step also gives the message its id, keeps it, and sends
    it when it goes live (`HISTORY_ROUTE`): the Route says `sent`."""

    def __init__(self, *args: object, history: RedisHistory, **options: object) -> None:
        super().__init__(*args, **options)  # type: ignore[arg-type]
        self._history = history
        self._history_route = self._client.register_script(HISTORY_ROUTE)
        self._history_requeue = self._client.register_script(HISTORY_REQUEUE)

    def route(self, player_id: str, frame: bytes, queue_if_offline: bool, keep: bool = True) -> Route:
        if not keep:
            return super().route(player_id, frame, queue_if_offline)
        history = self._history
        reply = self._route_with(
            self._history_route, player_id, frame, queue_if_offline,
            more_keys=[*history.settings_keys, self._keys.history_meta(player_id), self._keys.history(player_id)],
            more_args=[*history.settings_args, frame_text(frame),
                       *history.stream_args(Envelope(frame, player_id))])
        reply.pop()  # the id: the gateways read it with the message
        route = self._route_reply(reply, queue_if_offline)
        return route._replace(sent=bool(route.gateways))

    def _requeue_step(self, player_id: str, frame: bytes, queue: bool, requeue_args: list[object],
                      stamped: Stamped | None) -> list:
        if stamped is None or not stamped.player_seq:  # nothing kept for the player (a broadcast's copy)
            return super()._requeue_step(player_id, frame, queue, requeue_args, stamped)
        return self._route_with(self._history_requeue, player_id, frame, queue,
                                more_keys=[self._keys.history(player_id)],
                                more_args=[*requeue_args, stamped.player_seq, self._history.max_per_stream])
