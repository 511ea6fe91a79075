#!/usr/bin/env bash
# Fuzzes the parsers and the whole request path with cargo-fuzz (libFuzzer): builds the
# targets, seeds their corpora from fixtures/, runs each for a bounded time in one process, and
# prints one line per target. For humans; CI does not run it.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    default: 60 s, every target
#
# Needs the nightly toolchain (`rustup toolchain install nightly`); installs cargo-fuzz if it
# is missing. Corpora grow in fuzz/corpus/<target> from one run to the next; crashes land in
# fuzz/artifacts/<target>/ (replay one with `cargo +nightly fuzz run <target> <file>`), logs in
# fuzz/target/logs/. Exits 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all=(signature_header sign_verify envelope config_values settings request)
if (($#)); then targets=("$@"); else targets=("${all[@]}"); fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build

# --- seeds ---------------------------------------------------------------------------------
seed() { # seed TARGET NAME < bytes
  mkdir -p "fuzz/corpus/$1"
  cat >"fuzz/corpus/$1/seed-$2"
}

for f in fixtures/events/* fixtures/hostile/*; do
  name=$(basename "$f")
  seed envelope "$name" <"$f"
  seed sign_verify "$name" <"$f"
done
grep -o '"signature": "[^"]*"' fixtures/signatures/node-vectors.json | cut -d'"' -f4 |
  while read -r header; do
    printf '%s' "$header" | seed signature_header "${header:7:12}"
    printf '%s' "${header^^}" | seed signature_header "upper-${header:7:12}"
    printf 'sha1=%s' "${header:7}" | seed signature_header "sha1-${header:7:12}"
    printf '%s ' "$header" | seed signature_header "space-${header:7:12}"
  done
for value in 90s 5m 24h 7d '1h 30m' 15 262144 256KiB 1MiB '1 MB' 64MiB soon big 0s 1.5KiB; do
  printf '%s' "$value" | seed config_values "${value// /_}"
  # settings reads (variable index, value) pairs; these bytes are one such pair each.
  printf '\x01%s' "$value" | seed settings "${value// /_}"
done

# request: 11 bytes of choices, the length of the extras, the extras, then a body; see
# fuzz/fuzz_targets/request.rs. Choices: method path signature bit timestamp-mode offset(2)
# encoding delivery-id request-id flags (printf escapes).
request_seed() { # request_seed NAME CHOICES EXTRAS BODY-FILE
  local extras
  extras=$(printf "$3"; echo x) # the x keeps trailing newlines
  extras=${extras%x}
  {
    printf "$2"
    printf "\\x$(printf %02x "$(printf '%s' "$extras" | wc -c)")"
    printf '%s' "$extras"
    head -c 6000 "$4"
  } | seed request "$1"
}
for f in fixtures/events/*; do
  name=$(basename "$f" .json)
  request_seed "valid-$name" '\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00' '' "$f"
  request_seed "rotated-delivery-$name" '\x00\x00\x01\x00\x01\x00\x00\x01\x01\x01\x00' '' "$f"
done
for f in fixtures/hostile/*; do
  request_seed "hostile-$(basename "$f")" '\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' '' "$f"
done
body=fixtures/events/call.ended.json
request_seed stale '\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' '' "$body"
request_seed future-10min '\x00\x00\x00\x00\x02\x0a\x00\x00\x00\x00\x00' '' "$body"
request_seed past-25h '\x00\x00\x00\x00\x02\x24\xfa\x00\x00\x00\x00' '' "$body"
request_seed flipped-bit '\x00\x00\x04\x05\x01\x00\x00\x00\x00\x00\x00' '' "$body"
request_seed unsigned '\x00\x00\x03\x00\x01\x00\x00\x00\x00\x00\x00' '' "$body"
request_seed two-signatures '\x00\x00\x06\x00\x01\x00\x00\x00\x00\x00\x00' '' "$body"
request_seed gzip '\x00\x00\x00\x00\x01\x00\x00\x03\x00\x00\x00' '' "$body"
request_seed shutting-down '\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x02' '' "$body"
request_seed get '\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00' '' "$body"
request_seed other-path '\x00\x03\x00\x00\x01\x00\x00\x00\x00\x00\x00' '' "$body"
request_seed declared-too-large '\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x01' '\n\n\n\n\n99999' "$body"
request_seed extras '\x00\x05\x07\x00\x01\x00\x00\x04\x02\x02\x00' \
  'sha256=00\n/webhooks/kallina\nbr\n\x01id\nreq id' "$body"

# --- runs ----------------------------------------------------------------------------------
# The request target stores events in a sled directory under TMPDIR that libFuzzer's exit()
# leaves behind: give it a directory of its own and remove it afterwards.
scratch=$(mktemp -d -t kallina-relay-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p fuzz/target/logs
# Units and edge values for the settings' parsers: the sums and products of large durations
# are where they could break.
printf '"%s"\n' s m h d w y ms us ns min hours days KiB MiB GiB EiB KB MB B ' ' . \
  18446744073709551615 18446744073709551616 9223372036854775807 584942417355y 99999999999d \
  >"$scratch/config.dict"
summary=()
failed=0
for target in "${targets[@]}"; do
  mkdir -p "fuzz/artifacts/$target"
  find "fuzz/artifacts/$target" -type f | sort >"$scratch/before"
  extra=()
  # request: room for bodies past the 4 KiB limit the harness configures, so that 413 is
  # reachable; and no leak check, since the store and the harness's record of it grow by
  # design (LeakSanitizer ran after every input and took 60 % of the time, 12× fewer runs).
  [[ $target == request ]] && extra=(-max_len=8192 -detect_leaks=0)
  [[ $target == config_values || $target == settings ]] && extra=(-dict="$scratch/config.dict")
  log="fuzz/target/logs/$target.log"
  echo "fuzzing $target for ${seconds}s (log: $log)"
  TMPDIR=$scratch cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1 || true
  stat() { grep -o "stat::$1: *[0-9]*" "$log" | grep -o '[0-9]*$' | tail -1; }
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  corp=$(grep -o 'corp: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  find "fuzz/artifacts/$target" -type f | sort | comm -13 "$scratch/before" - >"$scratch/new"
  crashes=$(wc -l <"$scratch/new")
  ((crashes == 0)) || failed=1
  line=$(printf '%-17s runs %10s  exec/s %6s  cov %5s  ft %6s  corpus %5s  crashes %s' \
    "$target" "$(stat number_of_executed_units)" "$(stat average_exec_per_sec)" \
    "${cov:--}" "${ft:--}" "${corp:--}" "$crashes")
  if ((crashes > 0)); then
    line+="  ($(head -3 "$scratch/new" | tr '\n' ' ')see $log)"
  fi
  summary+=("$line")
done
echo
printf '%s\n' "${summary[@]}"
exit "$failed"
