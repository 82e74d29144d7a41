-- wrk script: PUT /v1/jobs/<type>/job_<random uuid v4> with a small JSON body.
-- Arguments (after --): the Authorization header value.
local auth

function init(args)
  auth = args[1]
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1000000))
end

local function hex(n)
  local digits = {}
  for i = 1, n do
    digits[i] = string.format("%x", math.random(0, 15))
  end
  return table.concat(digits)
end

request = function()
  local variant = string.format("%x", math.random(8, 11))
  local id = "job_" .. hex(8) .. "-" .. hex(4) .. "-4" .. hex(3) .. "-" .. variant .. hex(3) .. "-" .. hex(12)
  local headers = {["Authorization"] = auth, ["Content-Type"] = "application/json"}
  return wrk.format("PUT", wrk.path .. id, headers, '{"data":{"to":"someone@example.com","n":1}}')
end
