-- GCRA over several limits at once, on the Redis server's clock so every worker shares it.
-- KEYS[i]: one key per limit; ARGV[i]: its emission interval in microseconds.
-- Either every limit admits now (each theoretical arrival time moves on by its interval)
-- and the result is 0, or none is touched and the result is the microseconds to wait.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end
    tats[i] = tat
    if tat > now then
        local need = tat - now
        if need > wait then wait = need end
    end
end
if wait > 0 then
    return wait
end
for i, key in ipairs(KEYS) do
    local interval = tonumber(ARGV[i])
    local next_tat = tats[i] + interval
    redis.call('SET', key, next_tat, 'PX', math.ceil((next_tat - now) / 1000) + 1000)
end
return 0
