-- wrk script of `npm run bench`: replays the request list bench/load.ts wrote, one request per line:
--   METHOD <tab> PATH <tab> AUTHORIZATION <tab> BODY (empty for none; a body is sent as application/json)
-- Arguments after the URL: <file> <threads> <offset>. Each thread starts at its own place in the list (from
-- <offset>) and walks it in order, wrapping around. Requests are formatted once, in init, so that a request costs
-- wrk one table lookup. With WRK_COUNT_STATUS=1 answers are counted by status (wrk then parses every answer).
-- done() prints one line, "BENCH_RESULT {json}", for bench/load.ts.

local threads = {}
function setup (thread)
  table.insert(threads, thread)
  thread:set('index', #threads)
end

local requests, n, i = {}, 0, 0
statuses = {}

function init (args)
  for line in io.lines(args[1]) do
    local method, path, authorization, body = line:match('^(%u+)\t([^\t]+)\t([^\t]+)\t(.*)$')
    local headers = { Authorization = authorization }
    if body == '' then body = nil else headers['Content-Type'] = 'application/json' end
    n = n + 1
    requests[n] = wrk.format(method, path, headers, body)
  end
  i = (tonumber(args[3]) + math.floor(n * (index - 1) / tonumber(args[2]))) % n
end

function request ()
  i = i % n + 1
  return requests[i]
end

if os.getenv('WRK_COUNT_STATUS') == '1' then
  function response (status)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done (summary, latency)
  local merged, counts = {}, {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get('statuses')) do merged[status] = (merged[status] or 0) + count end
  end
  for status, count in pairs(merged) do counts[#counts + 1] = string.format('"%d":%d', status, count) end
  local e = summary.errors
  io.write(string.format('BENCH_RESULT {"requests":%d,"durationUs":%d,"p50Us":%d,"p99Us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(counts, ',')))
end
