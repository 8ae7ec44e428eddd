"""The shared ledger's server-side steps: Lua scripts that Redis runs atomically
(docs/reference.md §6 "Several replicas").

Each budget change is one script, so two replicas can never both see the same spare
budget, and the script that flips a threshold bit or a pause is the one that adds its
event to the stream: exactly once, whatever the replicas do. Money is integer units of
1e-10 USD; every clock is Redis's ``TIME``. Keys (prefix ``P``, passed as ARGV[1]; one
Redis primary, not Cluster):

- ``P s:<session>``, ``P a:<session>/<agent>``, ``P g``: a scope's hash: ``b`` budget
  (absent: none), ``sp`` spent, ``rv`` reserved and ``n`` in flight, ``p`` paused,
  ``r`` reason, ``w`` warned bits, ``wa`` warn-at amounts (csv), ``c`` created and
  ``l`` label (sessions), ``sd`` seeded (agents), ``per`` period and ``cfg`` configured
  budget (global);
- ``P rs`` hash reservation id → ``amount|scope keys``; ``P leases`` zset id → expiry ms;
- ``P done`` zset of settled ids (a retried settle changes nothing), kept 15 minutes;
- ``P w:<scope key>`` zset of waiting tickets by arrival; ``P wx`` hash ticket → expiry;
- ``P sessions`` zset session → last activity; ``P paused`` set; ``P budgeted`` set of
  sessions with a budget; ``P ab:<session>`` set of its agents with a budget;
- ``P events``, ``P evseq``: the event log (:mod:`spendgate.redis_bus`).
"""

from __future__ import annotations

from spendgate.redis_bus import LUA_EMIT

_COMMON = (
    LUA_EMIT
    + r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(v) return tonumber(v or '0') or 0 end
local function fmt(x) return string.format('%.0f', x) end
local function split(s)
  local out = {}
  if s and s ~= '' then for part in string.gmatch(s, '[^,]+') do out[#out + 1] = part end end
  return out
end
local function scope_of(key)
  local kind = 'session'
  if key == P .. 'g' then kind = 'global'
  elseif string.sub(key, #P + 1, #P + 2) == 'a:' then kind = 'agent' end
  return kind
end
local function names(key)
  local kind = scope_of(key)
  if kind == 'global' then return kind, nil, nil end
  local rest = string.sub(key, #P + 3)
  if kind == 'session' then return kind, rest, nil end
  local slash = string.find(rest, '/', 1, true)
  return kind, string.sub(rest, 1, slash - 1), string.sub(rest, slash + 1)
end
local function event(key, typ, maxlen, extra_k, extra_v)
  local kind, sid, aid = names(key)
  local h = redis.call('HMGET', key, 'b', 'sp', 'per')
  local d = {scope = kind, sessionId = sid or cjson.null,
             budgetU = h[1] or '', spentU = h[2] or '0'}
  if aid then d['agentId'] = aid end
  if kind == 'global' then
    if h[3] and h[3] ~= '' then d['period'] = h[3] else d['period'] = 'total' end
  end
  if extra_k then d[extra_k] = extra_v end
  if kind ~= 'global' then
    d['sessionLabel'] = redis.call('HGET', P .. 's:' .. sid, 'l') or cjson.null
  end
  emit(P, maxlen, typ, sid or '', cjson.encode(d), '1')
end
local function set_paused(key, on, reason, maxlen, why)
  local kind, sid = names(key)
  if on then
    redis.call('HSET', key, 'p', '1', 'r', reason)
    if kind == 'session' then redis.call('SADD', P .. 'paused', sid) end
    event(key, 'budget.paused', maxlen, 'reason', reason)
  else
    redis.call('HSET', key, 'p', '0', 'r', '')
    if kind == 'session' then redis.call('SREM', P .. 'paused', sid) end
    event(key, 'budget.resumed', maxlen, 'reason', why)
  end
end
-- thresholds crossed: warned bits kept only where spent still reaches them
local function crossed_bits(key)
  local h = redis.call('HMGET', key, 'b', 'sp', 'wa')
  if not h[1] then return 0 end
  local sp, bits = num(h[2]), 0
  for i, at in ipairs(split(h[3])) do
    if sp >= tonumber(at) then bits = bits + 2 ^ (i - 1) end
  end
  return bits
end
local function has_bit(bits, i) return math.floor(bits / 2 ^ (i - 1)) % 2 == 1 end
local function keep_crossed_warnings(key)  -- after a budget or spend change: a threshold
  local bits = crossed_bits(key)           -- no longer crossed may warn again
  local old = num(redis.call('HGET', key, 'w'))
  local kept = 0
  for i = 1, 53 do
    if has_bit(old, i) and has_bit(bits, i) then kept = kept + 2 ^ (i - 1) end
  end
  redis.call('HSET', key, 'w', fmt(kept))
end
local function spent_changed(key, thresholds, maxlen)
  local h = redis.call('HMGET', key, 'b', 'sp', 'wa', 'w', 'p')
  if not h[1] then return end
  local b, sp, bits = tonumber(h[1]), num(h[2]), num(h[4])
  local changed = false
  for i, at in ipairs(split(h[3])) do
    if not has_bit(bits, i) and sp >= tonumber(at) then
      bits = bits + 2 ^ (i - 1)
      changed = true
      event(key, 'budget.warning', maxlen, 'threshold', thresholds[i])
    end
  end
  if changed then redis.call('HSET', key, 'w', fmt(bits)) end
  if sp >= b and h[5] ~= '1' then
    set_paused(key, true, 'budget', maxlen)
    return true
  end
  return false
end
local function ensure_session(sid, default_b, default_wa, created)
  local key = P .. 's:' .. sid
  if redis.call('EXISTS', key) == 1 then return key, 0 end
  redis.call('HSET', key, 'sp', '0', 'rv', '0', 'n', '0', 'p', '0', 'w', '0', 'c', created)
  if default_b ~= '' then
    redis.call('HSET', key, 'b', default_b, 'wa', default_wa)
    redis.call('SADD', P .. 'budgeted', sid)
  end
  redis.call('ZADD', P .. 'sessions', now_ms(), sid)
  return key, 1
end
local function ensure_agent(sid, aid)
  local key = P .. 'a:' .. sid .. '/' .. aid
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'sp', '0', 'rv', '0', 'n', '0', 'p', '0', 'w', '0', 'sd', '0')
  end
  return key
end
-- a new calendar period: the global spend starts from zero and a budget pause lifts
local function roll(label, maxlen)
  local key = P .. 'g'
  if label == '' or redis.call('EXISTS', key) == 0 then return 0 end
  local per = redis.call('HGET', key, 'per')
  if per == label then return 0 end
  redis.call('HSET', key, 'sp', '0', 'w', '0', 'per', label)
  local h = redis.call('HMGET', key, 'p', 'r')
  if h[1] == '1' and h[2] == 'budget' then set_paused(key, false, nil, maxlen, 'period ended') end
  return 1
end
local function unreserve(key, amount)
  local n = redis.call('HINCRBY', key, 'n', -1)
  if n <= 0 then redis.call('HSET', key, 'n', '0', 'rv', '0')
  else redis.call('HINCRBY', key, 'rv', fmt(-amount)) end
end
local function release(rid)
  local v = redis.call('HGET', P .. 'rs', rid)
  if not v then return false end
  local parts = {}
  for part in string.gmatch(v, '[^|]+') do parts[#parts + 1] = part end
  local amount = tonumber(parts[1])
  for i = 2, #parts do unreserve(parts[i], amount) end
  redis.call('HDEL', P .. 'rs', rid)
  redis.call('ZREM', P .. 'leases', rid)
  return true
end
local function reap(now)
  local dead = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 64)
  for _, rid in ipairs(dead) do
    if release(rid) then redis.call('INCR', P .. 'lost') end
  end
  return #dead
end
local function fields(key)  -- a scope's raw fields, in the reply's order
  return redis.call('HMGET', key, 'b', 'sp', 'rv', 'n', 'p', 'r', 'l')
end
local function state_of(h)  -- raw fields as the reply gives them (absent: the default)
  return {h[1] or '', h[2] or '0', h[3] or '0', h[4] or '0', h[5] or '0', h[6] or '', h[7] or ''}
end
local function state(key) return state_of(fields(key)) end
local function forget_ticket(ticket)
  if ticket == '' then return end
  local on = redis.call('HGET', P .. 'wx', ticket)
  if on then
    local bar = string.find(on, '|', 1, true)
    redis.call('ZREM', string.sub(on, bar + 1), ticket)
  end
  redis.call('HDEL', P .. 'wx', ticket)
end
-- is someone still waiting ahead of this ticket for this scope's headroom?
local function behind(key, ticket, now)
  local wkey = P .. 'w:' .. key
  while true do
    local first = redis.call('ZRANGE', wkey, 0, 0)
    if #first == 0 then return false end
    local t = first[1]
    if t == ticket then return false end
    local on = redis.call('HGET', P .. 'wx', t)
    local exp = on and tonumber(string.sub(on, 1, string.find(on, '|', 1, true) - 1)) or 0
    if exp > now then return true end
    redis.call('ZREM', wkey, t)
    redis.call('HDEL', P .. 'wx', t)
  end
end
"""
)

ADMIT = (
    _COMMON
    + r"""
-- ARGV: P, the replica's constants as JSON [lease_ms default_b default_wa wait_ttl_ms
--       maxlen], the request's as JSON [sid aid rid amount created period ticket want_wait]
--       (two arguments instead of thirteen: the client formats each argument it sends)
local C, R = cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local sid, aid, rid, amount = R[1], R[2], R[3], tonumber(R[4])
local lease, ticket, want_wait = tonumber(C[1]), R[7], R[8] == '1'
local ttl, maxlen = tonumber(C[4]), C[5]
local now = now_ms()
reap(now)
roll(R[6], maxlen)
local skey, created = ensure_session(sid, C[2], C[3], R[5])
local keys = {skey}
if aid ~= '' then keys[#keys + 1] = ensure_agent(sid, aid) end
if redis.call('EXISTS', P .. 'g') == 1 then keys[#keys + 1] = P .. 'g' end
-- each scope's fields read once (b sp rv n p r l, the reply's order): the checks and
-- the answer use them, and a reservation updates them from what HINCRBY returns
local H = {}
for i, k in ipairs(keys) do H[i] = fields(k) end
local function answer(status, key, why)
  local out = {status, tostring(created), why or '', ticket}
  for i, k in ipairs(keys) do
    out[#out + 1] = k
    for _, v in ipairs(state_of(H[i])) do out[#out + 1] = v end
    out[#out + 1] = (k == key) and '1' or '0'
  end
  return out
end
if redis.call('HEXISTS', P .. 'rs', rid) == 1 then return answer('dup') end
for i, k in ipairs(keys) do
  local h = H[i]
  if h[5] == '1' then
    forget_ticket(ticket)
    return answer('refused', k, h[6] or 'manual')
  end
  if h[1] and num(h[2]) >= tonumber(h[1]) then
    forget_ticket(ticket)
    return answer('refused', k, 'budget')
  end
end
for i, k in ipairs(keys) do
  local h = H[i]
  local held = behind(k, ticket, now)
  if not held and h[1] and num(h[4]) > 0 and num(h[2]) + num(h[3]) + amount > tonumber(h[1]) then
    held = true
  end
  if held then
    if want_wait then
      if ticket == '' then
        ticket = fmt(redis.call('INCR', P .. 'wseq'))
      end
      local on = redis.call('HGET', P .. 'wx', ticket)
      if on then
        local old = string.sub(on, string.find(on, '|', 1, true) + 1)
        if old ~= P .. 'w:' .. k then redis.call('ZREM', old, ticket) end
      end
      redis.call('ZADD', P .. 'w:' .. k, 'NX', tonumber(ticket), ticket)
      redis.call('HSET', P .. 'wx', ticket, fmt(now + ttl) .. '|' .. P .. 'w:' .. k)
    end
    return answer('held', k, 'held')
  end
end
for i, k in ipairs(keys) do
  H[i][4] = fmt(redis.call('HINCRBY', k, 'n', 1))
  H[i][3] = fmt(redis.call('HINCRBY', k, 'rv', fmt(amount)))
end
redis.call('HSET', P .. 'rs', rid, fmt(amount) .. '|' .. table.concat(keys, '|'))
redis.call('ZADD', P .. 'leases', now + lease, rid)
redis.call('ZADD', P .. 'sessions', now, sid)
forget_ticket(ticket)
return answer('admitted')
"""
)

FORGET_TICKET = (
    _COMMON
    + r"""
forget_ticket(ARGV[2])
return 1
"""
)

SETTLE = (
    _COMMON
    + r"""
-- ARGV: P, the replica's constants as JSON [thresholds maxlen], the request's as JSON
--       [rid sid aid cost period]
local C, R = cjson.decode(ARGV[2]), cjson.decode(ARGV[3])
local rid, sid, aid, cost = R[1], R[2], R[3], tonumber(R[4])
local thresholds, maxlen = split(C[1]), C[2]
local now = now_ms()
local skey = P .. 's:' .. sid
if redis.call('ZSCORE', P .. 'done', rid) then
  return {'dup', redis.call('HGET', skey, 'sp') or '0'}
end
roll(R[5], maxlen)
local keys = {skey}
if aid ~= '' then keys[#keys + 1] = P .. 'a:' .. sid .. '/' .. aid end
if redis.call('EXISTS', P .. 'g') == 1 then keys[#keys + 1] = P .. 'g' end
if not release(rid) then redis.call('INCR', P .. 'late') end
local paused = {}  -- only the scopes this settle paused: the rest of their records did not change
if cost > 0 then
  for _, k in ipairs(keys) do
    if redis.call('EXISTS', k) == 1 then
      redis.call('HINCRBY', k, 'sp', fmt(cost))
      if spent_changed(k, thresholds, maxlen) then paused[#paused + 1] = k end
    end
  end
end
redis.call('ZADD', P .. 'done', now, rid)
if math.random(64) == 1 then redis.call('ZREMRANGEBYSCORE', P .. 'done', '-inf', now - 900000) end
local out = {'settled', redis.call('HGET', skey, 'sp') or '0'}
for _, k in ipairs(paused) do
  out[#out + 1] = k
  for _, v in ipairs(state(k)) do out[#out + 1] = v end
end
return out
"""
)

RELEASE = (
    _COMMON
    + r"""
return release(ARGV[2]) and 1 or 0
"""
)

RENEW = (
    _COMMON
    + r"""
-- ARGV: P lease_ms rid...
local expiry = now_ms() + tonumber(ARGV[2])
local n = 0
for i = 3, #ARGV do n = n + redis.call('ZADD', P .. 'leases', 'XX', 'CH', expiry, ARGV[i]) end
return n
"""
)

SET_BUDGET = (
    _COMMON
    + r"""
-- ARGV: P kind sid aid budget warn_at default_b default_wa created period maxlen configured
local kind, sid, aid, budget, wa = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local maxlen = ARGV[11]
roll(ARGV[10], maxlen)
local key, created = nil, 0
if kind == 'global' then
  key = P .. 'g'
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'sp', '0', 'rv', '0', 'n', '0', 'p', '0', 'w', '0', 'per', ARGV[10])
  end
  if ARGV[12] ~= '-' then redis.call('HSET', key, 'cfg', ARGV[12]) end
else
  local skey
  skey, created = ensure_session(sid, ARGV[7], ARGV[8], ARGV[9])
  key = skey
  if kind == 'agent' then key = ensure_agent(sid, aid) end
end
if budget == '' then
  redis.call('HDEL', key, 'b', 'wa')
else
  redis.call('HSET', key, 'b', budget, 'wa', wa)
end
local op = (budget == '') and 'SREM' or 'SADD'
if kind == 'session' then redis.call(op, P .. 'budgeted', sid)
elseif kind == 'agent' then redis.call(op, P .. 'ab:' .. sid, aid) end
keep_crossed_warnings(key)
local h = redis.call('HMGET', key, 'b', 'sp', 'p', 'r')
local over = h[1] and num(h[2]) >= tonumber(h[1])
if h[3] == '1' and h[4] == 'budget' and not over then
  set_paused(key, false, nil, maxlen, 'budget raised')
elseif over and h[3] ~= '1' then
  set_paused(key, true, 'budget', maxlen)
end
local out = {tostring(created), key}
for _, v in ipairs(state(key)) do out[#out + 1] = v end
return out
"""
)

PAUSE = (
    _COMMON
    + r"""
-- ARGV: P sid on(1/0) reason default_b default_wa created maxlen
local sid, on, reason, maxlen = ARGV[2], ARGV[3] == '1', ARGV[4], ARGV[8]
local key, created = ensure_session(sid, ARGV[5], ARGV[6], ARGV[7])
local h = redis.call('HMGET', key, 'b', 'sp', 'p')
if on then
  if h[3] ~= '1' then set_paused(key, true, reason, maxlen) end
else
  if h[1] and num(h[2]) >= tonumber(h[1]) then
    local out = {'refused', tostring(created)}
    for _, v in ipairs(state(key)) do out[#out + 1] = v end
    return out
  end
  if h[3] == '1' then set_paused(key, false, nil, maxlen, 'resumed') end
end
local out = {'ok', tostring(created)}
for _, v in ipairs(state(key)) do out[#out + 1] = v end
return out
"""
)

ROLL = (
    _COMMON
    + r"""
-- ARGV: P period maxlen
roll(ARGV[2], ARGV[3])
return state(P .. 'g')
"""
)

SEED = (
    _COMMON
    + r"""
-- ARGV: P key field value ...; writes the key only if Redis does not hold it
local key = ARGV[2]
if redis.call('EXISTS', key) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
return 1
"""
)

SEED_AGENT = (
    _COMMON
    + r"""
-- ARGV: P sid aid before: adds what the agent spent before seeding, once
local key = ensure_agent(ARGV[2], ARGV[3])
if redis.call('HGET', key, 'sd') == '1' then return 0 end
redis.call('HINCRBY', key, 'sp', ARGV[4])
redis.call('HSET', key, 'sd', '1')
return 1
"""
)

SET_LABEL = (
    _COMMON
    + r"""
-- ARGV: P sid label default_b default_wa created
local key, created = ensure_session(ARGV[2], ARGV[4], ARGV[5], ARGV[6])
local old = redis.call('HGET', key, 'l') or ''
local changed = 0
if old ~= ARGV[3] then
  changed = 1
  if ARGV[3] == '' then redis.call('HDEL', key, 'l') else redis.call('HSET', key, 'l', ARGV[3]) end
end
local out = {tostring(changed), tostring(created)}
for _, v in ipairs(state(key)) do out[#out + 1] = v end
return out
"""
)

FORGET = (
    _COMMON
    + r"""
-- ARGV: P global_spend maxlen sid... ; KEYS-like agent keys follow after '--'
local minus, maxlen = tonumber(ARGV[2]), ARGV[3]
local i = 4
while i <= #ARGV and ARGV[i] ~= '--' do
  local sid = ARGV[i]
  redis.call('DEL', P .. 's:' .. sid, P .. 'ab:' .. sid, P .. 'w:' .. P .. 's:' .. sid)
  redis.call('ZREM', P .. 'sessions', sid)
  redis.call('SREM', P .. 'paused', sid)
  redis.call('SREM', P .. 'budgeted', sid)
  i = i + 1
end
for j = i + 1, #ARGV do redis.call('DEL', ARGV[j], P .. 'w:' .. ARGV[j]) end
local g = P .. 'g'
if minus > 0 and redis.call('EXISTS', g) == 1 then
  local sp = num(redis.call('HGET', g, 'sp')) - minus
  if sp < 0 then sp = 0 end
  redis.call('HSET', g, 'sp', fmt(sp))
  keep_crossed_warnings(g)
  local h = redis.call('HMGET', g, 'b', 'p', 'r')
  local over = h[1] and sp >= tonumber(h[1])
  if h[2] == '1' and h[3] == 'budget' and not over then
    set_paused(g, false, nil, maxlen, 'sessions removed')
  end
end
return 1
"""
)
