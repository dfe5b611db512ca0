-- wrk's script for bench/run.py: a string.Template, filled in by measure.wrk_script.
wrk.method = "POST"
wrk.body = [==[${body}]==]
${headers}

local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) incomplete = 0 end
response = function(status, headers, body)
  if status == 200 and not string.find(body, [==[${marker}]==], 1, true) then
    incomplete = incomplete + 1
  end
end

done = function(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("incomplete") end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,' ..
    '"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"incomplete":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout, bad))
end
