"""`Roster` in Redis: presence, per-player limits and offline queues shared by every gateway.

Each decision that must be atomic across gateways is one Lua script, timed by Redis's own
clock (so hosts need not agree on the time):

* `reserve` counts the player's seats on every gateway against `-max-conns`;
* `route` sees whether any seat is present; if none, the frame joins the player's queue
  (oldest dropped past `-max-queued`), so a message is never both queued and sent live;
* `take_seat` makes the seat present and empties the queue in one step, so of two
  connections arriving at once on two gateways exactly one gets the backlog. The queue
  moves to the seat's handover until the gateway has the answer, so a step whose answer
  is lost is answered the same when retried, and `cancel` gives what it took back.

All queues of the cluster together are bounded by `-max-offline-bytes` and
`-max-offline-players` (cluster-wide, since the queues are the cluster's and Redis's
memory is what the bounds protect): `route` gives up the oldest frame of any player
first, found through a sorted set of every queue's oldest frame, and keeps each queue's
accounted bytes in a hash whose field "" is their total.

On a Redis Cluster a Lua step may only touch one slot, so players are hashed into
`CLUSTER_SHARDS` accounting shards (`RedisKeys`): a player's keys and its shard's
accounting share one hash tag, and each bound is split evenly between the shards (each
holds at most 1/16 of `-max-offline-bytes` and of `-max-offline-players`, rounded up):
the oldest frame given up is the oldest of the player's shard. The sweep, the census and
the heartbeat's refresh go through the shards one by one (a shard whose master is failing
over does not hold up the others); what concerns gateways (liveness, connection counts)
lives in one slot of its own, and the connection counters are changed beside the Lua
step that seats or unseats a connection instead of inside it. A single server is one
shard: its bounds and steps are exactly the cluster-wide ones.

Seats carry an expiry that each gateway refreshes every third of `-presence-ttl`; the
seats of a gateway that died expire by themselves, and its players count as offline
within `-presence-ttl`. The refresh checks every seat (`EXTEND`): one Redis lost,
whatever lost it (a restart, FLUSHALL, one evicted key), is reported and written back
with `take_seat`'s script, which hands over what was queued meanwhile. A frame routed
live names the seats it goes to; a copy whose connection closed on the way comes back
through `requeue` (`REQUEUE`, then `SETTLE` to put it back in publish order).

Counting who is online never walks the players (`census`): each gateway keeps its own
connection count in one hash (`take_seat` adds one, `leave` takes one off, the heartbeat
sets it, never while one of this gateway's seat steps is on its way: see `_CountKeeper`),
and a players index (a ZSET player -> latest seat expiry) gains a player when a seat is
taken (or extended) and loses it when its last present seat leaves, or when its expiry
passes (a dead gateway's players). A census sums one counter per live
gateway and counts the index after removing what expired since the last call: its cost
grows with the gateways, not with the players.

Queued frames live until `-offline-ttl`; one gateway at a time sweeps expired queues and
counts what they held.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import gevent.event
from redis.commands.core import Script

from wsgateway.broker_redis import LUA_LIVE_CONNECTIONS, LUA_STREAM_APPEND, STREAM_LENGTH, stream_ttl_ms
from wsgateway.errors import BrokerUnavailable
from wsgateway.history import Stamped
from wsgateway.offline import MESSAGE_OVERHEAD_BYTES, MISSED_RETENTION_S, Backlog
from wsgateway.redis_link import REDIS_ERRORS, Client, RedisKeys, broker_errors, is_cluster, pipelined
from wsgateway.roster import Census, Route, Seat

log = logging.getLogger(__name__)

SWEEP_BATCH = 200  # expired queues removed per sweep step
_MISSED_RETENTION_MS = int(MISSED_RETENTION_S * 1000)
SWEEP_INTERVAL_S = 1.0  # the cluster sweeps expired queues this often (one gateway per turn)
COUNTED_KEPT = 8  # heartbeats whose counted seats are kept until the gateway's stream reader reaches them
COUNT_SETTLE_WAIT_S = 2.0  # a count being set and the seat steps on their way wait for each other at most this

_LUA_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# Extend a key's expiry to `at` (ms) unless it already lasts longer.
_LUA_EXPIRE_AT_LEAST = """
local function expire_at_least(key, at)
  local current = redis.call('PEXPIRETIME', key)
  if current < at then redis.call('PEXPIREAT', key, at) end
end
"""

# The accounting of every queue together. heads: ZSET queue -> expiry of its oldest frame
# (the oldest of all is the first); sizes: HASH queue -> accounted bytes, field "" = total.
# Called after frames entered or left a queue, with what they counted.
_LUA_QUEUE_ACCOUNTS = """
local function item_size(item)
  return string.len(item) - string.find(item, ':', 1, true) + %d
end
-- A copy routed again after its connection closed (answered `delivered`), put back in its
-- publish-order place by SETTLE: its expiry is whole ms (ROUTE's have thousandths).
local function rerouted(item)
  local dot = string.find(item, '.', 1, true)
  return not dot or dot > string.find(item, ':', 1, true)
end
local function note_head(heads, queue)
  local head = redis.call('LINDEX', queue, 0)
  if head then
    redis.call('ZADD', heads, tonumber(string.sub(head, 1, string.find(head, ':', 1, true) - 1)), queue)
  else
    redis.call('ZREM', heads, queue)
  end
end
local function resize(sizes, queue, delta)
  if delta == 0 then return end
  if redis.call('HINCRBY', sizes, queue, delta) <= 0 then redis.call('HDEL', sizes, queue) end
  if redis.call('HINCRBY', sizes, '', delta) <= 0 then redis.call('HDEL', sizes, '') end
end
local function forget_queue(heads, sizes, queue)
  resize(sizes, queue, -(tonumber(redis.call('HGET', sizes, queue)) or 0))
  redis.call('ZREM', heads, queue)
end
""" % MESSAGE_OVERHEAD_BYTES

# Give up a queue's oldest frames past `max` (after frames went back to its front), counted
# in the player's missed hash (kept `retention` ms). Needs _LUA_QUEUE_ACCOUNTS. Returns
# {given up, of them the copies routed again}.
_LUA_GIVE_UP_PAST = """
local function give_up_past(queue, sizes, max, missed, retention)
  local dropped, dropped_rerouted = 0, 0
  while redis.call('LLEN', queue) > max do
    local gone = redis.call('LPOP', queue)
    resize(sizes, queue, -item_size(gone))
    if rerouted(gone) then dropped_rerouted = dropped_rerouted + 1 end
    dropped = dropped + 1
  end
  if dropped > 0 then
    redis.call('HINCRBY', missed, 'dropped', dropped)
    redis.call('PEXPIRE', missed, retention)
  end
  return dropped, dropped_rerouted
end
"""

# KEYS: seats. ARGV: ttl_ms, max_conns, seat. Returns 1 when the seat was granted.
RESERVE = _LUA_NOW_MS + _LUA_EXPIRE_AT_LEAST + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max = tonumber(ARGV[2])
if max > 0 and redis.call('ZCARD', KEYS[1]) >= max then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
expire_at_least(KEYS[1], now + tonumber(ARGV[1]))
return 1
"""

# KEYS: seats, present, queue, missed, queue index, players, queue heads, queue sizes, the
# seat's handover, and on a single server the gateway connections and the gateway's stream (on
# a cluster they live in other slots: counted apart, and the stream is not told).
# ARGV: presence_ttl_ms, seat, gateway, player, counted (1: a new connection, 0: a seat written
# back by `restore`, whose connection is counted already), handover ttl ms, stream length,
# stream ttl ms. A counted seat is told to the gateway's stream ("+seat\nplayer",
# broker_redis._COUNT_FIELD).
# The queue moves to the seat's handover, which its gateway deletes once it has the answer
# (`RedisRoster.take_seat`) or gives back to the queue when it never got it (CANCEL): the step
# is idempotent, so an answer lost on the way (a timeout, a reset connection, the client's
# retry) loses nothing. Run again for the same seat, it answers what it took before, then what
# was queued since.
# Returns {frames..., expired now, dropped since last connection, expired since last connection,
# of those expired now the copies routed again, items held in the handover}.
TAKE_SEAT = _LUA_NOW_MS + _LUA_EXPIRE_AT_LEAST + _LUA_QUEUE_ACCOUNTS + LUA_STREAM_APPEND + """
local expiry = now + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], expiry, ARGV[2])
local new_seat = redis.call('ZADD', KEYS[2], expiry, ARGV[2]) == 1
expire_at_least(KEYS[1], expiry)
expire_at_least(KEYS[2], expiry)
if KEYS[10] and ARGV[5] == '1' and new_seat then
  redis.call('HINCRBY', KEYS[10], ARGV[3], 1)
  stream_append(KEYS[11], ARGV[7], ARGV[8], {'c', '+' .. ARGV[2] .. '\\n' .. ARGV[4]})
end
redis.call('ZADD', KEYS[6], 'GT', expiry, ARGV[4])
local handover = KEYS[9]
local queued = redis.call('LRANGE', KEYS[3], 0, -1)
if #queued > 0 then
  if redis.call('EXISTS', handover) == 1 then
    for _, item in ipairs(queued) do redis.call('RPUSH', handover, item) end
  else
    redis.call('RENAME', KEYS[3], handover)
  end
  redis.call('PEXPIRE', handover, ARGV[6])
end
local items = redis.call('LRANGE', handover, 0, -1)
local missed = redis.call('HMGET', KEYS[4], 'dropped', 'expired')
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], KEYS[3])
forget_queue(KEYS[7], KEYS[8], KEYS[3])
local frames = {}
local expired, expired_rerouted = 0, 0
for _, item in ipairs(items) do
  local colon = string.find(item, ':', 1, true)
  if tonumber(string.sub(item, 1, colon - 1)) > now then
    frames[#frames + 1] = string.sub(item, colon + 1)
  else
    expired = expired + 1
    if rerouted(item) then expired_rerouted = expired_rerouted + 1 end
  end
end
frames[#frames + 1] = tostring(expired)
frames[#frames + 1] = tostring(tonumber(missed[1]) or 0)
frames[#frames + 1] = tostring((tonumber(missed[2]) or 0) + expired)
frames[#frames + 1] = tostring(expired_rerouted)
frames[#frames + 1] = tostring(#items)
return frames
"""

# KEYS: TAKE_SEAT's. ARGV: seat, gateway, player, max_queued, missed retention ms, offline_ttl_ms,
# stream length, stream ttl ms. Gives back a seat whose connection was never seated: its
# reservation, and what of TAKE_SEAT ran for it with its answer lost: the seat leaves as in
# LEAVE, and the items it took go back to the front of the queue, in order, their expiries
# kept (none later than anything queued since); past max_queued the oldest are given up.
# Returns {items given back, given up, of them the copies routed again}.
CANCEL = _LUA_NOW_MS + _LUA_QUEUE_ACCOUNTS + _LUA_GIVE_UP_PAST + LUA_STREAM_APPEND + """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  if KEYS[10] then
    redis.call('HINCRBY', KEYS[10], ARGV[2], -1)
    stream_append(KEYS[11], ARGV[7], ARGV[8], {'c', '-' .. ARGV[1] .. '\\n' .. ARGV[3]})
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[6], ARGV[3]) end
end
local items = redis.call('LRANGE', KEYS[9], 0, -1)
if #items == 0 then return {0, 0, 0} end
redis.call('DEL', KEYS[9])
local queue, heads, sizes = KEYS[3], KEYS[7], KEYS[8]
local was_empty = redis.call('EXISTS', queue) == 0
for index = #items, 1, -1 do
  redis.call('LPUSH', queue, items[index])
  resize(sizes, queue, item_size(items[index]))
end
local dropped, dropped_rerouted = give_up_past(queue, sizes, tonumber(ARGV[4]), KEYS[4], ARGV[5])
note_head(heads, queue)
local ttl = tonumber(ARGV[6])
if was_empty then redis.call('ZADD', KEYS[5], now + ttl, queue) end
redis.call('PEXPIRE', queue, 2 * ttl + 60000)
return {#items, dropped, dropped_rerouted}
"""

# KEYS: seats, present, players, and on a single server the gateway connections and stream (as
# TAKE_SEAT). ARGV: seat, gateway, player, stream length, stream ttl ms. The player leaves the
# players index with its last present seat. Returns when (Redis's clock, ms).
LEAVE = _LUA_NOW_MS + LUA_STREAM_APPEND + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[4] then
  redis.call('HINCRBY', KEYS[4], ARGV[2], -1)
  stream_append(KEYS[5], ARGV[4], ARGV[5], {'c', '-' .. ARGV[1] .. '\\n' .. ARGV[3]})
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[3], ARGV[3]) end
return now
"""

# KEYS: present, queue, missed, and the player's shard's queue index, queue heads, queue sizes,
# queue clock. ARGV: frame, queue_if_offline (1/0), max_queued, offline_ttl_ms, missed retention
# ms, the shard's max_offline_bytes and max_offline_players, its missed-key and queue-key prefixes.
# The queues given up for the shard's bounds are found in its queue heads: keys of the same
# shard, so of the same slot, named from the prefixes.
# Live (or offline without queueing): {0, 0, 0, seats...}.
# Offline: {1, queued (1/0), dropped, expired, over total bytes, over total players, of all
# those given up the copies routed again}.
# (ROUTE_BODY apart, so that history_redis can run it inside its own step.)
ROUTE_PREAMBLE = _LUA_NOW_MS + _LUA_QUEUE_ACCOUNTS
_ROUTE_LIVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local seats = redis.call('ZRANGE', KEYS[1], 0, -1)
if #seats > 0 or ARGV[2] == '0' then
  table.insert(seats, 1, 0)
  table.insert(seats, 1, 0)
  table.insert(seats, 1, 0)
  return seats
end
"""
_ROUTE_QUEUE = """
local heads, sizes = KEYS[5], KEYS[6]
local retention = ARGV[5]
local function lost(queue, what, count)
  local missed = ARGV[8] .. string.sub(queue, string.len(ARGV[9]) + 1)
  redis.call('HINCRBY', missed, what, count)
  redis.call('PEXPIRE', missed, retention)
end
local expired = 0
local given_up_rerouted = 0  -- of all given up here, the copies routed again (see `rerouted`)
local function given_up(item)
  if rerouted(item) then given_up_rerouted = given_up_rerouted + 1 end
end
while true do
  local head = redis.call('LINDEX', KEYS[2], 0)
  if not head then break end
  local colon = string.find(head, ':', 1, true)
  if tonumber(string.sub(head, 1, colon - 1)) > now then break end
  redis.call('LPOP', KEYS[2])
  resize(sizes, KEYS[2], -item_size(head))
  given_up(head)
  expired = expired + 1
end
if expired > 0 then lost(KEYS[2], 'expired', expired) end
local ttl = tonumber(ARGV[4])
-- the expiry, made unique and increasing across the cluster with thousandths, so that the
-- oldest frame of all is exactly the first in `heads`
local stamp = math.max((now + ttl) * 1000, (tonumber(redis.call('GET', KEYS[7])) or 0) + 1)
redis.call('SET', KEYS[7], string.format('%d', stamp), 'PX', 2 * ttl + 60000)
local item = string.format('%d.%03d', math.floor(stamp / 1000), stamp % 1000) .. ':' .. ARGV[1]
local size = item_size(item)
local max_bytes, max_players = tonumber(ARGV[6]), tonumber(ARGV[7])
if max_bytes > 0 and size > max_bytes then
  note_head(heads, KEYS[2])
  lost(KEYS[2], 'dropped', 1)
  return {1, 0, 0, expired, 1, 0, given_up_rerouted}
end
local dropped = 0
while redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[3]) do
  local gone = redis.call('LPOP', KEYS[2])
  resize(sizes, KEYS[2], -item_size(gone))
  given_up(gone)
  dropped = dropped + 1
end
if dropped > 0 then lost(KEYS[2], 'dropped', dropped) end
-- the bounds on every queue together: the oldest frame of all goes first
local over_bytes = 0
while max_bytes > 0 and (tonumber(redis.call('HGET', sizes, '')) or 0) + size > max_bytes do
  local oldest = redis.call('ZRANGE', heads, 0, 0)[1]
  if not oldest then redis.call('HDEL', sizes, '') break end  -- nothing left to count
  local gone = redis.call('LPOP', oldest)
  if gone then
    resize(sizes, oldest, -item_size(gone))
    given_up(gone)
    note_head(heads, oldest)
    lost(oldest, 'dropped', 1)
    over_bytes = over_bytes + 1
  else
    forget_queue(heads, sizes, oldest)  -- the list itself is gone (its backstop expiry)
  end
end
local over_players = 0
if max_players > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  while redis.call('ZCARD', heads) >= max_players do
    local oldest = redis.call('ZRANGE', heads, 0, 0)[1]
    local held = redis.call('LLEN', oldest)
    for _, item in ipairs(redis.call('LRANGE', oldest, 0, -1)) do given_up(item) end
    redis.call('DEL', oldest)
    redis.call('ZREM', KEYS[4], oldest)
    forget_queue(heads, sizes, oldest)
    if held > 0 then lost(oldest, 'dropped', held) end
    over_players = over_players + held
  end
end
redis.call('RPUSH', KEYS[2], item)
resize(sizes, KEYS[2], size)
note_head(heads, KEYS[2])
redis.call('ZADD', KEYS[4], now + ttl, KEYS[2])
-- a backstop only: the sweep removes (and counts) expired queues long before this
redis.call('PEXPIRE', KEYS[2], 2 * ttl + 60000)
return {1, 1, dropped, expired, over_bytes, over_players, given_up_rerouted}
"""
ROUTE_BODY = _ROUTE_LIVE + _ROUTE_QUEUE
ROUTE = ROUTE_PREAMBLE + ROUTE_BODY

# KEYS and ARGV: ROUTE's, then the seats the frame was routed to and those of them that
# missed it (their connection gone), each "\n"-joined, and whether it goes to the queue
# whoever is present (1/0) (ARGV 10, 11, 12). The missed seats stop counting as present;
# the frame goes live to seats taken since (not among those it was routed to), as many as
# the seats that missed it (one copy each: `delivered` counted one per seat; the newest
# first), or else to
# the queue, whoever else is present (they had their copies). Replies as ROUTE.
REQUEUE_BODY = """
local routed = {}
for seat in string.gmatch(ARGV[10], '[^\\n]+') do routed[seat] = true end
local copies = 0
for seat in string.gmatch(ARGV[11], '[^\\n]+') do
  redis.call('ZREM', KEYS[1], seat)
  copies = copies + 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local newer = {0, 0, 0}
if ARGV[12] ~= '1' then
  -- the newest first: the likeliest to have been sent nothing yet (see Delivery._admit_rerouted)
  for _, seat in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'REV')) do
    if not routed[seat] and #newer - 3 < copies then newer[#newer + 1] = seat end
  end
end
if #newer > 3 or ARGV[2] == '0' then return newer end
""" + _ROUTE_QUEUE
REQUEUE = ROUTE_PREAMBLE + REQUEUE_BODY

# KEYS: queue, missed, the player's shard's queue index, queue heads, queue sizes. ARGV:
# offline_ttl_ms, max_queued, missed retention ms, then the frames of a backlog `restore` took
# for a connection that closed meanwhile (`RedisRoster.return_backlog`). They go back to the
# front of the queue, in their order, each with an expiry just before the current head's (or
# now + ttl for an empty queue), thousandths apart: the queue stays in expiry order, and none
# outlives what the head it was queued before allows. Past max_queued the oldest are given up.
# Returns {given up, of them the copies routed again}.
RETURN_BACKLOG = _LUA_NOW_MS + _LUA_QUEUE_ACCOUNTS + _LUA_GIVE_UP_PAST + """
local queue, heads, sizes = KEYS[1], KEYS[4], KEYS[5]
local ttl = tonumber(ARGV[1])
local head = redis.call('LINDEX', queue, 0)
local first = (now + ttl) * 1000
if head then first = math.floor(tonumber(string.sub(head, 1, string.find(head, ':', 1, true) - 1)) * 1000) end
local count = #ARGV - 3
for index = count, 1, -1 do
  local stamp = first - (count - index + 1)
  local item = string.format('%d.%03d', math.floor(stamp / 1000), stamp % 1000) .. ':' .. ARGV[index + 3]
  redis.call('LPUSH', queue, item)
  resize(sizes, queue, item_size(item))
end
local dropped, dropped_rerouted = give_up_past(queue, sizes, tonumber(ARGV[2]), KEYS[2], ARGV[3])
note_head(heads, queue)
if not head then
  redis.call('ZADD', KEYS[3], now + ttl, queue)
  redis.call('PEXPIRE', queue, 2 * ttl + 60000)
end
return {dropped, dropped_rerouted}
"""

# KEYS: one shard's queue index, queue heads, queue sizes. ARGV: batch, missed-key prefix,
# queue-key prefix, missed retention ms. Removes queues whose every frame expired (the shard's,
# named in its index); returns {how many frames they held, of them copies routed again}.
SWEEP = _LUA_NOW_MS + _LUA_QUEUE_ACCOUNTS + """
local queues = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local expired, expired_rerouted = 0, 0
for _, queue in ipairs(queues) do
  local held = redis.call('LLEN', queue)
  if held > 0 then
    for _, item in ipairs(redis.call('LRANGE', queue, 0, -1)) do
      if rerouted(item) then expired_rerouted = expired_rerouted + 1 end
    end
    local player = string.sub(queue, string.len(ARGV[3]) + 1)
    redis.call('HINCRBY', ARGV[2] .. player, 'expired', held)
    redis.call('PEXPIRE', ARGV[2] .. player, ARGV[4])
    redis.call('DEL', queue)
  end
  forget_queue(KEYS[2], KEYS[3], queue)
  redis.call('ZREM', KEYS[1], queue)
  expired = expired + held
end
return {expired, expired_rerouted}
"""

# KEYS: gateways, gateway connections, broadcast readers. Returns the connections of live
# gateways that a broadcast reaches now: those registered as readers of their stream. A
# gateway back from a partition heartbeats (and counts) before its reader is registered again.
REACH = _LUA_NOW_MS + LUA_LIVE_CONNECTIONS + """
live_connections(KEYS[1], KEYS[2])
local total = 0
for _, gateway in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local reading_until = tonumber(redis.call('ZSCORE', KEYS[3], gateway))
  if reading_until and reading_until > now then
    total = total + (tonumber(redis.call('HGET', KEYS[2], gateway)) or 0)
  end
end
return total
"""

# KEYS: gateways, gateway connections, players. Returns {players, connections}.
CENSUS = _LUA_NOW_MS + LUA_LIVE_CONNECTIONS + """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
return {redis.call('ZCARD', KEYS[3]), live_connections(KEYS[1], KEYS[2])}
"""

# KEYS: gateways, gateway connections. Returns the connections of live gateways (a cluster's census).
CONNECTIONS = _LUA_NOW_MS + LUA_LIVE_CONNECTIONS + """
return live_connections(KEYS[1], KEYS[2])
"""

# KEYS: one shard's players index. Returns the players present in that shard (a cluster's census).
PLAYERS = _LUA_NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: present. Returns the seats that are present and not expired.
PRESENCE = _LUA_NOW_MS + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

# KEYS: gateways, gateway connections, and on a single server the gateway's stream. ARGV:
# ttl_ms, gateway, connections, the heartbeat's number, stream length, stream ttl ms. The
# stream is told the count was set ("=number", see `RedisRoster.counted_at`).
HEARTBEAT = _LUA_NOW_MS + LUA_STREAM_APPEND + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if KEYS[3] then stream_append(KEYS[3], ARGV[5], ARGV[6], {'c', '=' .. ARGV[4]}) end
"""

# KEYS: queue, the player's shard's queue heads. ARGV: frame, expiry_ms, most items to look at.
# A frame requeued after its connection closed was appended (ROUTE) behind frames queued
# after it was sent live. Find it from the tail (a later identical frame is as good) and
# move it back to where its expiry, counted from when it was sent, puts it: the queue
# stays in expiry order, and so in publish order. The expiry is one ms short of that, so
# that it goes before a frame queued in the very ms it was sent, but after frames
# requeued before it with the same expiry. It only moves an item: counts and sizes are
# untouched, and the queue heads say the queue's new oldest frame when it moved to the front.
SETTLE = _LUA_QUEUE_ACCOUNTS + """
local expiry = tonumber(ARGV[2])
local later = {}
local found = false
for _ = 1, tonumber(ARGV[3]) do
  local tail = redis.call('LINDEX', KEYS[1], -1)
  if not tail then break end
  local colon = string.find(tail, ':', 1, true)
  if found and tonumber(string.sub(tail, 1, colon - 1)) <= expiry then break end
  redis.call('RPOP', KEYS[1])
  if not found and string.sub(tail, colon + 1) == ARGV[1] then
    found = true
  else
    later[#later + 1] = tail
  end
end
if found then redis.call('RPUSH', KEYS[1], expiry .. ':' .. ARGV[1]) end
for index = #later, 1, -1 do redis.call('RPUSH', KEYS[1], later[index]) end
if found then note_head(KEYS[2], KEYS[1]) end
return found and 1 or 0
"""

# KEYS: seats, present, the player's shard's players index. ARGV: presence_ttl_ms, seat, player.
# Extends the seat where it exists (and the player in the players index with it);
# returns 0 when Redis no longer has it in both.
EXTEND = _LUA_NOW_MS + """
local expiry = now + tonumber(ARGV[1])
local found = 1
for index = 1, 2 do
  local key = KEYS[index]
  if redis.call('ZADD', key, 'XX', 'CH', expiry, ARGV[2]) == 0 and not redis.call('ZSCORE', key, ARGV[2]) then
    found = 0
  end
  redis.call('PEXPIRE', key, ARGV[1], 'GT')
end
if found == 1 then redis.call('ZADD', KEYS[3], 'GT', expiry, ARGV[3]) end
return found
"""


class _CountKeeper:
    """Keeps this gateway's connection count in Redis exact while it is both changed and
    set. A seat step (`take_seat`, `leave`) adds or takes one; the heartbeat sets the
    count to the seats this process holds. A set sent while a step is
    on its way undoes it whichever reaches Redis first (a connection counted nowhere, or
    one gone counted twice), until the next heartbeat: a census right after a connect was
    one short. So a set waits until the steps on their way were answered, and new steps
    wait for the set; each waits at most `COUNT_SETTLE_WAIT_S` (a round trip in practice;
    past it the set goes ahead, as before, and the next heartbeat corrects the count)."""

    def __init__(self) -> None:
        self._steps_on_their_way = 0
        self._no_step_on_its_way = gevent.event.Event()
        self._no_step_on_its_way.set()
        self._not_setting = gevent.event.Event()
        self._not_setting.set()

    @contextmanager
    def step(self) -> Iterator[None]:
        """Around a seat step: its change of the count and of the seats held here."""
        self._not_setting.wait(COUNT_SETTLE_WAIT_S)
        self._steps_on_their_way += 1
        self._no_step_on_its_way.clear()
        try:
            yield
        finally:
            self._steps_on_their_way -= 1
            if not self._steps_on_their_way:
                self._no_step_on_its_way.set()

    @contextmanager
    def setting(self) -> Iterator[None]:
        """Around the step that sets the count from the seats held here (the heartbeat)."""
        self._not_setting.clear()
        try:
            self._no_step_on_its_way.wait(COUNT_SETTLE_WAIT_S)
            yield
        finally:
            self._not_setting.set()


def _backlog(reply: list[bytes]) -> Backlog:
    """A TAKE_SEAT reply: the frames, then four counts (and the handover's size, `_handed`)."""
    return Backlog(frames=list(reply[:-5]), expired=int(reply[-5]), missed_dropped=int(reply[-4]),
                   missed_expired=int(reply[-3]), expired_rerouted=int(reply[-2]))


def _handed(reply: list[bytes]) -> bool:
    """Whether a TAKE_SEAT reply left items in the seat's handover, to be deleted."""
    return int(reply[-1]) > 0


def gateway_of(seat_id: str) -> str:
    """The gateway id a seat id starts with (`gateway/serial`)."""
    return seat_id.rsplit("/", 1)[0]


class RedisRoster:
    """`Roster` shared through Redis by every gateway started with the same -broker."""

    def __init__(self, client: Client, keys: RedisKeys, gateway_id: str, *, max_conns_per_player: int,
                 max_queued: int, offline_ttl_s: float, presence_ttl_s: float,
                 max_offline_bytes: int = 0, max_offline_players: int = 0,
                 sweep_interval_s: float = SWEEP_INTERVAL_S, stream_length: int = STREAM_LENGTH) -> None:
        """`max_offline_bytes`, `max_offline_players`: bounds on the cluster's queues together
        (0 = none); every gateway of a cluster should be given the same. With several
        accounting shards (a Redis Cluster) each shard holds its share, rounded up.
        `stream_length`: the broker's (-broker-stream-length), for the count entries
        this roster appends to the gateway's stream on a single server."""
        self.max_conns_per_player = max_conns_per_player
        self.gateway_id = gateway_id
        self._client = client
        self._keys = keys
        self._max_queued = max_queued
        self._cluster = is_cluster(client)
        shards = len(keys.shards)
        self._max_offline_bytes = math.ceil(max_offline_bytes / shards)  # per shard
        self._max_offline_players = math.ceil(max_offline_players / shards)  # per shard
        self._offline_ttl_ms = int(offline_ttl_s * 1000)
        self._handover_ttl_ms = 2 * self._offline_ttl_ms + 60_000  # a backstop, as a queue's own expiry
        self._presence_ttl_ms = int(presence_ttl_s * 1000)
        self._sweep_interval_ms = max(1, int(sweep_interval_s * 1000))
        self._seat_numbers = itertools.count(1)
        self._stream_args = [stream_length, stream_ttl_ms(presence_ttl_s)]
        self._heartbeat_numbers = itertools.count(1)
        self._counted: dict[int, dict[str, str]] = {}  # heartbeat number -> the seats it counted (seat -> player)
        self._present: dict[str, set[str]] = {}  # player -> its seat ids here, for the heartbeat
        self._next_refresh_at = 0.0  # time.monotonic()
        self._count = _CountKeeper()
        self._reserve = client.register_script(RESERVE)
        self._take_seat = client.register_script(TAKE_SEAT)
        self._cancel = client.register_script(CANCEL)
        self._route = client.register_script(ROUTE)
        self._sweep = client.register_script(SWEEP)
        self._leave = client.register_script(LEAVE)
        self._reach = client.register_script(REACH)
        self._census = client.register_script(CENSUS)
        self._players = client.register_script(PLAYERS)
        self._connections = client.register_script(CONNECTIONS)
        self._presence = client.register_script(PRESENCE)
        self._heartbeat = client.register_script(HEARTBEAT)
        self._requeue = client.register_script(REQUEUE)
        self._extend = client.register_script(EXTEND)
        self._settle = client.register_script(SETTLE)
        self._return_backlog = client.register_script(RETURN_BACKLOG)

    @property
    def queueing(self) -> bool:
        return self._max_queued > 0 and self._offline_ttl_ms > 0

    def reserve(self, player_id: str) -> Seat | None:
        seat = Seat(player_id, f"{self.gateway_id}/{next(self._seat_numbers)}")
        with broker_errors("reserve"):
            granted = self._reserve(keys=[self._keys.seats(player_id)],
                                    args=[self._presence_ttl_ms, self.max_conns_per_player, seat.seat_id])
        return seat if granted else None

    def cancel(self, seat: Seat) -> tuple[int, int]:
        with broker_errors("cancel"):
            given_back, dropped, rerouted = self._cancel(
                keys=self._seat_keys(seat),
                args=[seat.seat_id, self.gateway_id, seat.player_id, self._max_queued, _MISSED_RETENTION_MS,
                      self._offline_ttl_ms, *self._stream_args])
        if given_back:
            log.warning("backlog of a connection never seated put back in its queue",
                        extra={"event": "backlog_given_back", "player_id": seat.player_id,
                               "messages": int(given_back)})
        return int(dropped), int(rerouted)

    def _seat_keys(self, seat: Seat) -> list[str]:
        """TAKE_SEAT's (and CANCEL's) keys: the player's, the seat's handover, its shard's
        accounting and, on a single server (one slot for all), the gateway connection counters."""
        keys = self._keys
        player_id = seat.player_id
        shard = keys.shard_of(player_id)
        seat_keys = [keys.seats(player_id), keys.present(player_id), shard.queue(player_id), shard.missed(player_id),
                     shard.queue_index, shard.players, shard.queue_heads, shard.queue_sizes,
                     shard.handover(seat.seat_id)]
        if not self._cluster:
            seat_keys += [keys.gateway_connections, keys.stream(self.gateway_id)]
        return seat_keys

    def take_seat(self, seat: Seat) -> Backlog:
        player = seat.player_id
        with self._count.step():
            with broker_errors("take seat"):
                if self._cluster:
                    # Counted first: a count one too high until the next heartbeat is harmless,
                    # a backlog taken by a step whose answer is then lost would not be.
                    self._client.hincrby(self._keys.gateway_connections, self.gateway_id, 1)
                reply = self._take_seat(keys=self._seat_keys(seat),
                                        args=[self._presence_ttl_ms, seat.seat_id, self.gateway_id, player, 1,
                                              self._handover_ttl_ms, *self._stream_args])
            self._present.setdefault(player, set()).add(seat.seat_id)
        if _handed(reply):
            self._end_handovers([seat])
        return _backlog(reply)

    def _end_handovers(self, seats: list[Seat]) -> None:
        """The answers of these seats' TAKE_SEAT arrived: their handovers are done with. A
        handover left behind (Redis out of reach just now) only expires."""
        try:
            with broker_errors("end handover"):
                self._client.delete(*[self._keys.handover(seat.player_id, seat.seat_id) for seat in seats])
        except BrokerUnavailable:
            pass

    def leave(self, seat: Seat) -> int:
        keys = self._keys
        player = seat.player_id
        leave_keys = [keys.seats(player), keys.present(player), keys.shard_of(player).players]
        if not self._cluster:
            leave_keys += [keys.gateway_connections, keys.stream(self.gateway_id)]
        with self._count.step():
            self._forget_seat(seat)
            with broker_errors("leave"):
                left_at_ms = int(self._leave(keys=leave_keys,
                                             args=[seat.seat_id, self.gateway_id, player, *self._stream_args]))
                if self._cluster:
                    self._client.hincrby(keys.gateway_connections, self.gateway_id, -1)
        return left_at_ms

    def route(self, player_id: str, frame: bytes, queue_if_offline: bool, keep: bool = True) -> Route:
        return self._route_reply(self._route_with(self._route, player_id, frame, queue_if_offline), queue_if_offline)

    def _route_with(self, script: Script, player_id: str, frame: bytes, queue_if_offline: bool,
                    more_keys: Sequence[str] = (), more_args: Sequence[object] = ()) -> list:
        """Run ROUTE, or a script that runs ROUTE_BODY first with the same KEYS and ARGV
        followed by `more_keys` and `more_args`; its reply."""
        keys = self._keys
        shard = keys.shard_of(player_id)
        queue = queue_if_offline and self.queueing
        with broker_errors("route"):
            return script(
                keys=[keys.present(player_id), shard.queue(player_id), shard.missed(player_id), shard.queue_index,
                      shard.queue_heads, shard.queue_sizes, shard.queue_clock, *more_keys],
                args=[frame, 1 if queue else 0, self._max_queued, self._offline_ttl_ms, _MISSED_RETENTION_MS,
                      self._max_offline_bytes, self._max_offline_players, shard.missed(""), shard.queue(""),
                      *more_args])

    def _route_reply(self, reply: list, queue_if_offline: bool) -> Route:
        if int(reply[0]):
            queued, dropped, expired, over_bytes, over_players, rerouted = (int(value) for value in reply[1:])
            return Route(frozenset(), 0, queued=bool(queued), dropped=dropped, expired=expired,
                         over_total_bytes=over_bytes, over_total_players=over_players, given_up_rerouted=rerouted)
        seats = reply[3:]
        if seats:
            seat_ids = frozenset(seat.decode() for seat in seats)
            return Route(frozenset(gateway_of(seat) for seat in seat_ids), len(seats), seats=seat_ids)
        return Route(frozenset(), 0, queueing_off=queue_if_offline and not self.queueing)

    def reach(self) -> int:
        with broker_errors("reach"):
            return int(self._reach(keys=[self._keys.gateways, self._keys.gateway_connections, self._keys.streams]))

    def requeue(self, player_id: str, frame: bytes, routed_to: frozenset[str], missed: frozenset[str],
                sent_at_ms: int = 0, to_queue: bool = False, queue: bool = True,
                stamped: Stamped | None = None) -> Route:
        """The copy routed live to the seats `missed` (this gateway's) found their
        connections gone (they closed while it travelled): those seats stop counting as
        present (this gateway's other seats of the player are untouched), and the copy is
        routed again (REQUEUE): to seats taken since (unless `to_queue`), or to the queue,
        where it moves back before what was queued after `sent_at_ms` (see SETTLE); never
        to the queue unless `queue`."""
        for seat_id in missed:
            self._forget_seat(Seat(player_id, seat_id))
        reply = self._requeue_step(player_id, frame, queue,
                                   ["\n".join(sorted(routed_to)), "\n".join(sorted(missed)), 1 if to_queue else 0],
                                   stamped)
        route = self._route_reply(reply, queue)
        if route.queued and sent_at_ms:
            with broker_errors("requeue"):
                self._settle(keys=[self._keys.queue(player_id), self._keys.shard_of(player_id).queue_heads],
                             args=[frame, sent_at_ms + self._offline_ttl_ms - 1, self._max_queued])
        return route

    def _requeue_step(self, player_id: str, frame: bytes, queue: bool, requeue_args: list[object],
                      stamped: Stamped | None) -> list:
        """REQUEUE's reply (`requeue_args`: its ARGV 10-12); HistoryRoster's step also
        marks the message queued in the history."""
        return self._route_with(self._requeue, player_id, frame, queue, more_args=requeue_args)

    def presence(self, player_id: str) -> int:
        with broker_errors("presence"):
            return int(self._presence(keys=[self._keys.present(player_id)]))

    def census(self) -> Census:
        """One step on a single server; on a cluster the live gateways' connections, then
        each shard's players (1 + `CLUSTER_SHARDS` steps, whatever the number of players)."""
        keys = self._keys
        with broker_errors("census"):
            if not self._cluster:
                players, connections = self._census(keys=[keys.gateways, keys.gateway_connections,
                                                          keys.shards[0].players])
                return Census(int(players), int(connections))
            connections = self._connections(keys=[keys.gateways, keys.gateway_connections])
            players = sum(int(self._players(keys=[shard.players])) for shard in keys.shards)
        return Census(players, int(connections))

    def maintain(self) -> tuple[int, int]:
        """Sweep expired queues (one gateway at a time), shard by shard."""
        expired = rerouted = 0
        with broker_errors("maintain"):
            if not self._client.set(self._keys.sweep_lock, self.gateway_id, nx=True, px=self._sweep_interval_ms):
                return 0, 0
            for shard in self._keys.shards:
                swept, swept_rerouted = self._sweep(keys=[shard.queue_index, shard.queue_heads, shard.queue_sizes],
                                                    args=[SWEEP_BATCH, shard.missed(""), shard.queue(""),
                                                          _MISSED_RETENTION_MS])
                expired, rerouted = expired + int(swept), rerouted + int(swept_rerouted)
        return expired, rerouted

    def refresh(self, force: bool = False) -> list[Seat]:
        """Every third of -presence-ttl (or now, when `force`d, or when this gateway's
        registration is gone, which is checked at every call): extend every present seat
        of this gateway, and return those Redis no longer had, whatever lost them (a
        restart, FLUSHALL, eviction of one player's keys, a long outage): `restore` writes
        them back. Only existing entries are extended here, so that a seat that just left
        is never brought back. Called every second, a lost registration (a restart or a
        flush) is noticed within a second: until then, the gateway's connections are
        missing from every broadcast's reach."""
        if not force and time.monotonic() < self._next_refresh_at:
            with broker_errors("refresh"):
                if self._client.zscore(self._keys.gateways, self.gateway_id) is not None:
                    return []
        self._next_refresh_at = time.monotonic() + self._presence_ttl_ms / 3000
        with self._count.setting():
            seats = [Seat(player, seat_id) for player, seat_ids in list(self._present.items()) for seat_id in seat_ids]
            number = next(self._heartbeat_numbers)
            heartbeat_keys = [self._keys.gateways, self._keys.gateway_connections]
            if not self._cluster:
                heartbeat_keys.append(self._keys.stream(self.gateway_id))
                self._counted[number] = {seat.seat_id: seat.player_id for seat in seats}
                while len(self._counted) > COUNTED_KEPT:
                    del self._counted[min(self._counted)]
            with broker_errors("refresh"):
                self._heartbeat(keys=heartbeat_keys,
                                args=[self._presence_ttl_ms, self.gateway_id, len(seats), number, *self._stream_args])
        with broker_errors("refresh"):
            if not seats:
                return []
            if not self._cluster:
                return self._extend_seats(seats)
        return self._extend_by_shard(seats)

    def _extend_seats(self, seats: list[Seat]) -> list[Seat]:
        """Extend `seats` in one pipeline; return those Redis no longer had."""
        pipeline = self._client.pipeline(transaction=False)
        for seat in seats:
            player = seat.player_id
            pipelined(pipeline, self._extend,
                      [self._keys.seats(player), self._keys.present(player), self._keys.shard_of(player).players],
                      [self._presence_ttl_ms, seat.seat_id, player])
        found = pipeline.execute()
        return [seat for seat, there in zip(seats, found) if not there]

    def _extend_by_shard(self, seats: list[Seat]) -> list[Seat]:
        """A cluster's refresh, one pipeline per shard: while one master is away (a
        failover) the seats on the others are still extended, so their players do not
        expire from presence however long the switch takes. The shards that failed are
        logged and tried again at the next heartbeat."""
        by_shard: dict[str, list[Seat]] = {}
        for seat in seats:
            by_shard.setdefault(self._keys.shard_of(seat.player_id).base, []).append(seat)
        lost: list[Seat] = []
        failed: list[str] = []
        for shard, shard_seats in by_shard.items():
            try:
                lost.extend(self._extend_seats(shard_seats))
            except REDIS_ERRORS as exc:
                failed.append(f"{shard}: {type(exc).__name__}: {exc}")
        if failed:
            log.warning("presence not refreshed on some shards", extra={
                "event": "presence_refresh_failed", "shards": len(failed), "detail": failed[0]})
            if len(failed) == len(by_shard):
                raise BrokerUnavailable(f"redis refresh failed: {failed[0]}")
        return lost

    def restore(self, seats: list[Seat]) -> dict[str, Backlog]:
        """Write lost seats back (those still here), each as `take_seat` does: whatever
        was queued for the player meanwhile, while it looked offline, is returned by
        player, to be delivered to the connection that was there all along."""
        seats = [seat for seat in seats if seat.seat_id in self._present.get(seat.player_id, ())]
        if not seats:
            return {}
        log.warning("presence lost in redis, writing it back",
                    extra={"event": "presence_restored", "seats": len(seats)})
        with broker_errors("restore"):
            pipeline = self._client.pipeline(transaction=False)
            for seat in seats:
                # not counted again: the heartbeat before (`refresh`) wrote this gateway's count,
                # and a broadcast's reach must never see a connection twice meanwhile
                pipelined(pipeline, self._take_seat, self._seat_keys(seat),
                          [self._presence_ttl_ms, seat.seat_id, self.gateway_id, seat.player_id, 0,
                           self._handover_ttl_ms, *self._stream_args])
            replies = pipeline.execute()
        handed = [seat for seat, reply in zip(seats, replies) if _handed(reply)]
        if handed:
            self._end_handovers(handed)
        backlogs: dict[str, Backlog] = {}
        for seat, reply in zip(seats, replies):
            backlog = _backlog(reply)
            if backlog.frames or backlog.expired or backlog.missed_dropped or backlog.missed_expired \
                    or seat.player_id not in backlogs:
                backlogs[seat.player_id] = backlog
        return backlogs

    def return_backlog(self, player_id: str, frames: list[bytes]) -> tuple[int, int]:
        if not frames:
            return 0, 0
        shard = self._keys.shard_of(player_id)
        with broker_errors("return backlog"):
            dropped, rerouted = self._return_backlog(
                keys=[shard.queue(player_id), shard.missed(player_id), shard.queue_index, shard.queue_heads,
                      shard.queue_sizes],
                args=[self._offline_ttl_ms, self._max_queued, _MISSED_RETENTION_MS, *frames])
        return int(dropped), int(rerouted)

    def counted_at(self, number: int) -> dict[str, str]:
        """The seats (seat id -> player) the heartbeat numbered `number` set this gateway's
        count to, as its stream's "=number" entry says (then forgotten, with older ones).
        Kept for the last `COUNTED_KEPT` heartbeats; for an older one (a reader far
        behind), the seats held now, which the next heartbeat's entry makes right."""
        counted = self._counted.pop(number, None)
        for older in [kept for kept in self._counted if kept < number]:
            del self._counted[older]
        if counted is None:
            counted = {seat_id: player for player, seat_ids in self._present.items() for seat_id in seat_ids}
        return counted

    def _forget_seat(self, seat: Seat) -> None:
        seat_ids = self._present.get(seat.player_id)
        if seat_ids is not None:
            seat_ids.discard(seat.seat_id)
            if not seat_ids:
                del self._present[seat.player_id]

    def close(self) -> None:
        with broker_errors("close"):
            pipeline = self._client.pipeline(transaction=False)
            pipeline.zrem(self._keys.gateways, self.gateway_id)
            pipeline.hdel(self._keys.gateway_connections, self.gateway_id)
            pipeline.execute()
