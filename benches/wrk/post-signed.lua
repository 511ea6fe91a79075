-- wrk script for the harness's scenarios of new events: POSTs signed bodies to
-- /webhooks/kallina, every one different, each with its own X-Kallina-Delivery id as well.
-- The relay's dedup key is always the body's hash, so only different bodies are new events.
--
-- Signing every body in Lua would make wrk, not the relay, the bottleneck (a 100 KB body is
-- 1600 SHA-256 blocks). So every body is one shared prefix (a whole number of 64-byte blocks)
-- and a 64-byte tail that carries the request's tag; the harness hashes the HMAC key block and
-- the prefix once and hands over the SHA-256 state after them, and per request this script
-- hashes only the tail, its padding and the outer HMAC block: three compressions, whatever the
-- body's size (benches/harness/signed.rs checks the result against the relay's `sign`).
--
-- KALLINA_BENCH_BODY_FILE: the prefix; KALLINA_BENCH_TAIL_FILL: the tail's first bytes;
-- KALLINA_BENCH_INNER_STATE / KALLINA_BENCH_OUTER_STATE: the SHA-256 states (64 hex digits)
-- after (key ^ ipad) ‖ prefix and after (key ^ opad); KALLINA_BENCH_RUN: part of each id.
local bit = require("bit")
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local ror, rshift, lshift, tobit, tohex = bit.ror, bit.rshift, bit.lshift, bit.tobit, bit.tohex

local file = io.open(os.getenv("KALLINA_BENCH_BODY_FILE"), "rb")
local prefix = file:read("*a")
file:close()
local fill = os.getenv("KALLINA_BENCH_TAIL_FILL")
local run = os.getenv("KALLINA_BENCH_RUN") or "0"

local function state(hex)
  local words = {}
  for i = 1, 8 do
    words[i] = tobit(tonumber(hex:sub(8 * i - 7, 8 * i), 16))
  end
  return words
end
local inner_state = state(os.getenv("KALLINA_BENCH_INNER_STATE"))
local outer_state = state(os.getenv("KALLINA_BENCH_OUTER_STATE"))

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}

local w = {}
-- One SHA-256 compression of the 64 bytes of `s` from `at` into the 8 words of `H`. Sums of a
-- few 32-bit words are exact in Lua's doubles; tobit wraps them to 32 bits.
local function compress(H, s, at)
  for i = 0, 15 do
    local a, b, c, d = s:byte(at + 4 * i, at + 4 * i + 3)
    w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
  end
  for i = 16, 63 do
    local x, y = w[i - 15], w[i - 2]
    local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
    local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
    w[i] = tobit(w[i - 16] + s0 + w[i - 7] + s1)
  end
  local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
  for i = 0, 63 do
    local t1 = h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g))
      + K[i + 1] + w[i]
    local t2 = bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c))
    h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
  end
  H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
  H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
end

local function be32(x)
  return string.char(band(rshift(x, 24), 255), band(rshift(x, 16), 255), band(rshift(x, 8), 255),
    band(x, 255))
end

-- The final block of a message whose last whole block has been hashed: 0x80, zeros, and the
-- message's length in bits (always below 2^32 here).
local function padding(rest, bytes)
  return rest .. "\128" .. string.rep("\0", 55 - #rest) .. "\0\0\0\0" .. be32(bytes * 8)
end

-- The key block and the prefix precede the tail in the inner hash.
local inner_bytes = 64 + #prefix + 64
assert(#prefix % 64 == 0, "the prefix must be whole SHA-256 blocks")

local function signature(tail)
  local H = { unpack(inner_state) }
  compress(H, tail, 1)
  compress(H, padding("", inner_bytes), 1)
  local digest = ""
  for i = 1, 8 do
    digest = digest .. be32(H[i])
  end
  local O = { unpack(outer_state) }
  compress(O, padding(digest, 64 + 32), 1)
  local hex = {}
  for i = 1, 8 do
    hex[i] = tohex(O[i], 8)
  end
  return "sha256=" .. table.concat(hex)
end

local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function request()
  counter = counter + 1
  local tag = string.format("-%02d-%010d", thread_id, counter)
  local tail = fill .. tag .. '"}}'
  assert(#tail == 64, "the tail must be one SHA-256 block")
  headers["X-Kallina-Signature"] = signature(tail)
  headers["X-Kallina-Delivery"] = run .. tag
  return wrk.format("POST", "/webhooks/kallina", headers, prefix .. tail)
end
