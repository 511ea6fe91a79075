-- wrk script for the benchmark harness: POSTs one signed body to /webhooks/kallina.
-- KALLINA_BENCH_BODY_FILE: the body; KALLINA_BENCH_SIGNATURE: its X-Kallina-Signature.
-- KALLINA_BENCH_UNIQUE=1 adds a distinct X-Kallina-Delivery id to every request (the relay
-- runs with KALLINA_RELAY_ID_HEADER=X-Kallina-Delivery), so every request is a new event.
local file = io.open(os.getenv("KALLINA_BENCH_BODY_FILE"), "rb")
local body = file:read("*a")
file:close()
local signature = os.getenv("KALLINA_BENCH_SIGNATURE")
local unique = os.getenv("KALLINA_BENCH_UNIQUE") == "1"
local run = os.getenv("KALLINA_BENCH_RUN") or "0"

local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

local counter = 0
local headers = { ["Content-Type"] = "application/json", ["X-Kallina-Signature"] = signature }
-- Built on first use, not at load: wrk fills in the Host header only once the thread runs.
local static_request = nil

function request()
  if not unique then
    static_request = static_request or wrk.format("POST", "/webhooks/kallina", headers, body)
    return static_request
  end
  counter = counter + 1
  headers["X-Kallina-Delivery"] = "bench-" .. run .. "-" .. thread_id .. "-" .. counter
  return wrk.format("POST", "/webhooks/kallina", headers, body)
end
