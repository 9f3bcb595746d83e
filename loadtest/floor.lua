-- wrk script: the kit's request shape against the floor (a cross-check of loadgen):
--   wrk -t1 -c32 -d5s -s loadtest/floor.lua http://127.0.0.1:PORT/events
-- Unique event ids per thread; 2xx counted in response(). Not used for the proxy (wrk cannot
-- tell which customer a response belongs to; see loadtest/README.md).
local counter = 0
local ok = 0
local thread_id = 0
local now = os.date("!%Y-%m-%dT%H:%M:%SZ")

function setup(thread)
  thread:set("thread_id", thread_id)
  thread_id = thread_id + 1
end

request = function()
  counter = counter + 1
  local body = string.format(
    '{"customer_external_id":"u%d","events":[{"id":"wrk-%d-%d","event_type":"video_promoted","occurred_at":"%s"}]}',
    counter % 1000, thread_id, counter, now)
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-CREDYT-API-KEY"] = "none"}, body)
end

response = function(status, headers, body)
  if status >= 200 and status < 300 then ok = ok + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("wrk: %.0f req/s, p50 %.2f ms, p99 %.2f ms, non-2xx %d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, summary.errors.status))
end
