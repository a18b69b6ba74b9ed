-- wrk script: POSTs pre-built multipart bodies in turn and prints one JSON line of results.
--
-- bench/wrk.py writes the bodies (one file each, the same boundary) and sets:
--   WRK_PATH      the endpoint, e.g. /ner
--   WRK_BODIES    a file listing the body files, one path per line
--   WRK_BOUNDARY  the multipart boundary of every body
local path = os.getenv("WRK_PATH")
local boundary = os.getenv("WRK_BOUNDARY")
local bodies = {}
local counter = 0

function init(args)
  for name in io.lines(os.getenv("WRK_BODIES")) do
    local file = assert(io.open(name, "rb"))
    bodies[#bodies + 1] = file:read("*a")
    file:close()
  end
  counter = math.random(#bodies)
end

function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", path, {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, bodies[counter])
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %d, '
      .. '"errors_connect": %d, "errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
