-- wrk script: POST a distinct quote per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil,
    '{"text":"Benchmark quote ' .. n .. ' from a wrk thread, about the length of a real one.","author":"wrk"}')
end
