-- wrk script for benchmarks/run.py: POST the AdmissionReview in $PINHOOK_BENCH_BODY to the
-- URL's path and print one JSON line of figures at the end (run.py reads the line that starts
-- with PINHOOK-WRK). Percentiles are wrk's, after its coordinated-omission correction.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = assert(io.open(os.getenv("PINHOOK_BENCH_BODY"), "rb"))
wrk.body = file:read("*a")
file:close()

-- Each request is a new one: the count of requests sent (from $PINHOOK_BENCH_FIRST, 8 hex
-- digits) is written over each XXXXXXXX of the body (the review's uid, and whatever else the
-- workload marked), as benchmarks/load.py describes.
local parts = {}
for part in (wrk.body .. "XXXXXXXX"):gmatch("(.-)XXXXXXXX") do
  parts[#parts + 1] = part
end
if #parts > 1 then
  local sent = tonumber(os.getenv("PINHOOK_BENCH_FIRST") or "0")
  request = function()
    sent = (sent + 1) % 4294967296
    return wrk.format(nil, nil, nil, table.concat(parts, string.format("%08x", sent)))
  end
end

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'PINHOOK-WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
      .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
