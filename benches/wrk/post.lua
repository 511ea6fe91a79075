-- wrk script for the harness's duplicates scenario: POSTs one signed body to
-- /webhooks/kallina, the same request every time (the first is new, every other a duplicate).
-- KALLINA_BENCH_BODY_FILE: the body; KALLINA_BENCH_SIGNATURE: its X-Kallina-Signature.
-- New events come from post-signed.lua.
local file = io.open(os.getenv("KALLINA_BENCH_BODY_FILE"), "rb")
local body = file:read("*a")
file:close()
local headers = {
  ["Content-Type"] = "application/json",
  ["X-Kallina-Signature"] = os.getenv("KALLINA_BENCH_SIGNATURE"),
}
-- Built on first use, not at load: wrk fills in the Host header only once the thread runs.
local static_request = nil

function request()
  static_request = static_request or wrk.format("POST", "/webhooks/kallina", headers, body)
  return static_request
end
