#!/usr/bin/env bash
# Power-cut campaign: the relay runs in a QEMU VM on a disk whose write cache really is lost.
#
#   scripts/power-loss.sh [--control] TRIALS
#
# Each trial: a fresh ext4 image served by nbdkit through its cache filter in writeback mode,
# so writes the guest has not flushed live only in nbdkit's memory (like a disk's volatile
# cache); boot the VM, which sends events to the relay; a random 0.5–4 s after the first
# acknowledgement, kill -9 QEMU and nbdkit together; serve the image again with an empty cache,
# boot again and check that every acknowledged event is still there (admin API) and is
# answered as a duplicate, that the store takes a new event, and that the store's count of its
# outbox is what the check found in it (`miscounted` trials).
#
# Exit status: 0 nothing lost or miscounted; 1 an acknowledged event was lost (or a store did
# not come back), or a count was wrong;
# 2 the harness itself failed. With --control the relay is built with
# `--cfg kallina_relay_skip_sync` (its store skips its syncs) and the meaning flips: 0 when the
# campaign caught a loss, 1 when it did not, 2 on a harness failure.
#
# Needs root only to install missing Debian packages. Environment: KPL_SMP (vCPUs, default 2),
# KPL_MEM (MiB, default 1024), KPL_SENDERS (concurrent senders in the VM, default 8),
# KPL_SEED (first trial's seed, to replay a trial's events).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

control=0
if [ "${1:-}" = --control ]; then control=1; shift; fi
trials="${1:-}"
case "$trials" in
  '' | *[!0-9]* | 0) echo "usage: $0 [--control] TRIALS" >&2; exit 2 ;;
esac

say() { echo "power-loss: $*" >&2; }
total_acked=0 total_lost=0 done_trials=0 replay_trials=0 miscounted=0
summary() {
  echo "power-loss: trials=$done_trials acknowledged=$total_acked lost=$total_lost" \
    "replayed-in=$replay_trials miscounted=$miscounted"
}
die() { say "harness failure: $*"; summary; exit 2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
export PATH="$PATH:/usr/sbin:/sbin"

# --- packages -----------------------------------------------------------------------------
missing=()
for pkg in qemu-system-x86 nbdkit busybox-static e2fsprogs cpio; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install failed"
fi

work=$(mktemp -d /tmp/power-loss.XXXXXX)
# apt-get download runs as _apt, which must reach a folder in here.
chmod 755 "$work"
qemu_pid='' nbd_pid=''
cleanup() {
  for pid in $qemu_pid $nbd_pid; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in $qemu_pid $nbd_pid; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

out="$root/target/power-loss"
mkdir -p "$out"

# --- kernel -------------------------------------------------------------------------------
# Debian's cloud kernel has ext4 built in and only the few virtio modules to load; the
# metapackage names the current one.
resolve_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
kpkg=$(resolve_kernel || true)
if [ -z "$kpkg" ] && ! ls "$out"/kernel/linux-image-*/boot/vmlinuz-* >/dev/null 2>&1; then
  as_root apt-get update -qq || die "apt-get update failed"
  kpkg=$(resolve_kernel || true)
fi
if [ -z "$kpkg" ]; then
  # Offline, or the index is gone: any kernel unpacked by an earlier run will do.
  kdir=$(ls -d "$out"/kernel/linux-image-* 2>/dev/null | tail -n 1)
  [ -n "$kdir" ] || die "cannot resolve linux-image-cloud-amd64 with apt-cache"
else
  kdir="$out/kernel/$kpkg"
fi
if [ ! -d "$kdir/boot" ]; then
  say "downloading $kpkg"
  dl="$work/download"
  mkdir -p "$dl"
  chmod 777 "$dl"
  if ! (cd "$dl" && apt-get download -q "$kpkg" >/dev/null); then
    # A stale package index names a version the mirror no longer has.
    as_root apt-get update -qq || die "apt-get update failed"
    (cd "$dl" && apt-get download -q "$kpkg" >/dev/null) || die "apt-get download $kpkg failed"
  fi
  rm -rf "$kdir" "$kdir.tmp"
  mkdir -p "$kdir.tmp"
  dpkg -x "$dl"/*.deb "$kdir.tmp" || die "dpkg -x failed"
  mv "$kdir.tmp" "$kdir"
fi
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n 1)
kver=${vmlinuz##*/vmlinuz-}
modules="$kdir/lib/modules/$kver/kernel/drivers"

# --- relay and client, static ---------------------------------------------------------------
# Static, so the initramfs needs no libc. An explicit --target keeps crt-static away from build
# scripts and proc macros; an own target dir keeps these flags from invalidating the normal build.
build="$out/build"
bin="$build/x86_64-unknown-linux-gnu/release"
cargo_static() { # cargo-args...
  local t0
  t0=$(date +%s)
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$build" \
    cargo build --release --locked --quiet --target x86_64-unknown-linux-gnu "$@" \
    || die "cargo build failed"
  say "build: $(($(date +%s) - t0)) s ($*)"
}
cargo_static --bin kallina-relay --example power-loss-client
if [ "$control" = 1 ]; then
  grep -rqs kallina_relay_skip_sync src/ \
    || say "warning: src/ has no kallina_relay_skip_sync: the control build syncs as usual"
  # The cfg goes in through a workspace wrapper rather than RUSTFLAGS: only this crate is
  # compiled again (a minute, not a second full release build), and its artifacts get their
  # own hashes, so the normal build stays fresh. The client is the same in both modes.
  RUSTC_WORKSPACE_WRAPPER="$root/scripts/power-loss/skip-sync-rustc" cargo_static --bin kallina-relay
fi
# Whichever build ran last is the one cargo copied to this path.
relay_bin="$bin/kallina-relay"
client_bin="$bin/examples/power-loss-client"

# --- initramfs ------------------------------------------------------------------------------
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,modules,proc,sys,dev,tmp,data}
cp /bin/busybox "$rootfs/bin/busybox"
cp "$root/scripts/power-loss/init" "$rootfs/init"
chmod 755 "$rootfs/init"
cp "$relay_bin" "$rootfs/bin/kallina-relay"
cp "$client_bin" "$rootfs/bin/power-loss-client"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
  ko=$(find "$modules" -name "$m.ko" | head -n 1)
  [ -n "$ko" ] || die "module $m.ko not in ${kdir#"$root"/}"
  cp "$ko" "$rootfs/modules/"
done
initrd="$work/initrd.gz"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1 >"$initrd") || die "cpio failed"

# --- one trial ------------------------------------------------------------------------------
now_ms() { date +%s%3N; }

start_nbd() { # image socket
  rm -f "$2"
  # The cache filter's temporary file is the volatile cache: deleted, never written back,
  # when nbdkit is killed.
  TMPDIR="$work" nbdkit --foreground --unix "$2" --filter=cache file file="$1" cache=writeback &
  nbd_pid=$!
  local i
  for i in $(seq 100); do
    [ -S "$2" ] && return 0
    kill -0 "$nbd_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

start_vm() { # socket console append
  # cache=writeback: the guest sees a volatile write cache and its flushes reach nbdkit.
  qemu-system-x86_64 -accel tcg -cpu max -smp "${KPL_SMP:-2}" -m "${KPL_MEM:-1024}" \
    -nodefaults -display none -no-reboot -monitor none -serial "file:$2" \
    -kernel "$vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1 random.trust_cpu=on kpl.senders=${KPL_SENDERS:-8} $3" \
    -drive "file=nbd+unix:///?socket=$1,format=raw,if=virtio,cache=writeback" \
    >"$2.qemu" 2>&1 &
  qemu_pid=$!
}

# Waits until file $1 has a line matching $2, for at most $3 s; fails early when QEMU is gone.
wait_line() {
  local deadline=$(($(date +%s) + $3))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    grep -qE "$2" "$1" 2>/dev/null && return 0
    kill -0 "$qemu_pid" 2>/dev/null || { grep -qE "$2" "$1" 2>/dev/null; return; }
    sleep 0.1
  done
  return 1
}

stop_all() {
  # Both at once, no shutdown: the guest's page cache and nbdkit's unflushed cache vanish.
  kill -9 $qemu_pid $nbd_pid 2>/dev/null || true
  wait $qemu_pid $nbd_pid 2>/dev/null || true
  qemu_pid='' nbd_pid=''
}

keep_logs() { # trial reason
  local dest="$out/logs/$(date +%Y%m%d-%H%M%S)-trial$1"
  mkdir -p "$dest"
  cp "$work"/t/*.log* "$dest/" 2>/dev/null || true
  echo "$2" >"$dest/reason"
  say "trial $1: logs kept in ${dest#"$root"/}"
}

seed=${KPL_SEED:-$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))}
for n in $(seq "$trials"); do
  t="$work/t"
  rm -rf "$t"; mkdir -p "$t"
  img="$t/disk.img"
  truncate -s 1G "$img"
  # Inode tables and journal zeroed now, so no lazy-init thread writes during the trial.
  mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 "$img" || die "mkfs.ext4 failed"
  start=$(date +%s)
  trial_t0=$(now_ms)

  start_nbd "$img" "$work/nbd1.sock" || die "nbdkit did not start"
  start_vm "$work/nbd1.sock" "$t/write.log" "kpl.phase=write kpl.seed=$seed kpl.start=$start"
  wait_line "$t/write.log" '^READY' 120 \
    || { keep_logs "$n" "no READY in the write phase"; die "trial $n: relay not up (write phase)"; }
  boot_ms=$(($(now_ms) - trial_t0))
  wait_line "$t/write.log" '^ACK ' 120 \
    || { keep_logs "$n" "no ACK in the write phase"; die "trial $n: no event acknowledged"; }
  cut=$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", 0.5 + rand() * 3.5 }')
  sleep "$cut"
  if ! kill -0 "$qemu_pid" 2>/dev/null; then
    keep_logs "$n" "VM gone before the cut"
    grep -q '^KPL relay exited' "$t/write.log" && die "trial $n: the relay died while receiving"
    die "trial $n: the VM stopped before the cut"
  fi
  stop_all

  # Only lines the console delivered before the cut count; \r comes from the tty.
  tr -d '\r' <"$t/write.log" >"$t/write.txt"
  grep -E '^ACK [0-9]+ 2[0-9][0-9]$' "$t/write.txt" | cut -d' ' -f2 | LC_ALL=C sort -u >"$t/acked" || true
  upto=$(grep -E '^(SENT|ACK) [0-9]+( |$)' "$t/write.txt" | cut -d' ' -f2 | sort -n | tail -n 1)
  acked=$(wc -l <"$t/acked")

  check_t0=$(now_ms)
  start_nbd "$img" "$work/nbd2.sock" || die "nbdkit did not start again"
  start_vm "$work/nbd2.sock" "$t/check.log" \
    "kpl.phase=check kpl.seed=$seed kpl.start=$start kpl.upto=$upto"
  # Resending is slow under emulation (up to 1 MiB a body): the bound grows with the events.
  check_limit=$((180 + upto))
  wait_line "$t/check.log" '^KPL poweroff' "$check_limit" || true
  stop_all
  check_ms=$(($(now_ms) - check_t0))
  tr -d '\r' <"$t/check.log" >"$t/check.txt"
  grep -q '^KPL mounted' "$t/check.txt" \
    || { keep_logs "$n" "check phase did not mount the disk"; die "trial $n: check phase did not mount"; }

  # An acknowledged event survives when the admin API has it, with its bytes, and a resend is a
  # duplicate. Anything else, a missing line included, is a loss.
  good="$t/good"
  grep -E '^CHECK [0-9]+ get=200 status=(pending|published) body=ok post=200 duplicate$' \
    "$t/check.txt" | cut -d' ' -f2 | LC_ALL=C sort -u >"$good" || true
  lost=$(comm -23 "$t/acked" "$good" | wc -l)
  stored_unacked=$(comm -13 "$t/acked" "$good" | wc -l)
  problem=''
  grep -qE '^NEW 202 accepted$' "$t/check.txt" || problem="the store did not accept a new event"
  # No broker in the VM, so everything stored waits in the outbox: what the check found there
  # before its resends, what its resends stored anew, and the new event. The store's count of
  # it, which the cut may have left behind or counted twice, must be that.
  held=$(grep -cE '^CHECK [0-9]+ get=200 ' "$t/check.txt" || true)
  held=$((held + $(grep -cE '^CHECK [0-9]+ .* post=202 ' "$t/check.txt" || true)))
  if grep -qE '^NEW 202 accepted$' "$t/check.txt"; then held=$((held + 1)); fi
  counted=$(sed -n 's/^KPL outbox \([0-9-]*\)$/\1/p' "$t/check.txt" | head -n 1)
  miscount=''
  if [ "${counted:-}" != "$held" ]; then
    miscount="the store counts ${counted:-nothing} events in its outbox and holds $held"
    miscounted=$((miscounted + 1))
  fi
  if grep -q '^KPL relay exited' "$t/check.txt"; then
    problem="the relay exited in the check phase (store did not open?)"
  elif ! grep -q '^CHECK-DONE$' "$t/check.txt"; then
    problem="no CHECK-DONE within ${check_limit} s"
  fi
  if [ -n "$problem" ]; then
    # A store that does not come back has lost everything it acknowledged.
    lost=$acked
  fi
  # Events answered before the cut that sled had lost, indexed again from the body log.
  replayed=$(sed -n 's/^KPL replayed \([0-9]*\)$/\1/p' "$t/check.txt" | head -n 1)
  if [ "${replayed:-0}" -gt 0 ]; then replay_trials=$((replay_trials + 1)); fi
  ms=$(($(now_ms) - trial_t0))
  line="trial $n/$trials: acked=$acked lost=$lost ms=$ms (seed=$seed sent=$((upto + 1))"
  line+=" replayed=${replayed:-0}"
  line+=" stored-unacked=$stored_unacked boot-to-ready=${boot_ms}ms cut=${cut}s check=${check_ms}ms)"
  echo "$line${problem:+ FAILED: $problem}${miscount:+ MISCOUNTED: $miscount}"
  if [ "$lost" -gt 0 ] || [ -n "$problem$miscount" ]; then
    [ "$lost" -gt 0 ] && say "trial $n: lost $(comm -23 "$t/acked" "$good" | sort -n | head -n 30 | tr '\n' ' ')"
    keep_logs "$n" "lost=$lost ${problem}"
  fi
  # The latest trial's consoles stay for a look even when all went well.
  rm -rf "$out/last"; mkdir -p "$out/last"; cp "$t"/*.log "$out/last/" 2>/dev/null || true
  total_acked=$((total_acked + acked))
  total_lost=$((total_lost + lost))
  done_trials=$n
  seed=$((seed + 1))
done

summary
if [ "$control" = 1 ]; then
  [ "$total_lost" -gt 0 ] && exit 0
  exit 1
fi
[ "$total_lost" -eq 0 ] && [ "$miscounted" -eq 0 ] || exit 1
