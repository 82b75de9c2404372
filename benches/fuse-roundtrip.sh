#!/bin/bash
# What one FUSE request costs on this machine, whatever the daemon does.
#
# A forced stat (statx with AT_STATX_FORCE_SYNC: the kernel may not answer it
# from its attribute cache) of 100 files, N times over, on: the local
# directory itself, efscache mounted over it, and efs-sim --profile local (a
# no-delay passthrough) over it. Each forced stat through a mount is one
# FUSE GETATTR round trip: rsync process -> kernel -> daemon thread -> kernel
# -> rsync. This is the price of every request the kernel sends efscache
# (about 14 per file copied by rsync -a, one per file in the first re-sync
# after a copy: docs/BENCHMARKS.md), and it bounds how close to local disk
# any FUSE filesystem gets here.
#
# Then, on a machine with 2 or more cores, where that time goes: the same
# stats with the daemon and the caller pinned to one core and to two
# different cores, and a pipe ping-pong between two processes (no FUSE at
# all) pinned the same two ways. A request whose daemon thread wakes on
# another, idle core pays for waking that core; a virtual machine pays the
# most for it when its idle cores halt instead of polling (on KVM guests:
# /sys/module/haltpoll/parameters/guest_halt_poll_ns, printed below).
#
# Usage: benches/fuse-roundtrip.sh [N]   (as root; N stats per run, default
# 20000; needs target/release/efscache and target/release/efs-sim)
set -euo pipefail
N=${1:-20000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
E=$ROOT/target/release/efscache S=$ROOT/target/release/efs-sim
W=$(mktemp -d /var/tmp/efscache-roundtrip.XXXXXX)
SIM_PID=""
cleanup() {
  "$E" umount "$W/ec" >/dev/null 2>&1 || umount -l "$W/ec" 2>/dev/null || true
  [ -n "$SIM_PID" ] && kill -TERM "$SIM_PID" 2>/dev/null && sleep 0.5
  awk -v m="$W/sim" '$5==m{f=1} END{exit !f}' /proc/self/mountinfo && umount -l "$W/sim"
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/back" "$W/ec" "$W/cache" "$W/sim"
for i in $(seq 0 99); do : > "$W/back/f$i"; done

# Microseconds per forced stat of DIR/f0..f99, round robin, N calls; with a
# second argument, the caller runs pinned to that core.
forced_stats() {
  local pin=()
  [ -n "${2:-}" ] && pin=(taskset -c "$2")
  "${pin[@]}" python3 - "$1" "$N" <<'PY'
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_STATX_FORCE_SYNC, STATX_BASIC_STATS = -100, 0x100, 0x2000, 0x7FF
buf = ctypes.create_string_buffer(256)
d, n = sys.argv[1], int(sys.argv[2])
paths = [os.path.join(d, "f%d" % i).encode() for i in range(100)]
t = time.perf_counter()
for i in range(n):
    if libc.statx(AT_FDCWD, paths[i % 100], AT_SYMLINK_NOFOLLOW | AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, buf):
        raise OSError(ctypes.get_errno(), "statx", paths[i % 100])
print("%.1f" % ((time.perf_counter() - t) / n * 1e6))
PY
}

"$E" mount "$W/back" "$W/ec" -o "cache_dir=$W/cache"
"$S" --profile local --daemon "$W/back" "$W/sim" > "$W/sim.out" 2> "$W/sim.err" &
for _ in $(seq 100); do
  SIM_PID=$(head -1 "$W/sim.out" 2>/dev/null | tr -dc 0-9)
  [ -n "$SIM_PID" ] && break
  sleep 0.05
done
[ -n "$SIM_PID" ] || { echo "efs-sim did not start: $(cat "$W/sim.err")" >&2; exit 1; }

echo "forced stats (statx AT_STATX_FORCE_SYNC), $N per run, microseconds per stat; three runs each"
for target in "local directory:$W/back" "efscache:$W/ec" "efs-sim --profile local:$W/sim"; do
  name=${target%%:*} dir=${target#*:}
  forced_stats "$dir" > /dev/null # warm up: every name looked up once
  printf '%-26s %s\n' "$name" "$(for _ in 1 2 3; do forced_stats "$dir"; done | tr '\n' ' ')"
done

[ "$(nproc)" -ge 2 ] || exit 0
# Microseconds per round trip of one byte between two processes over two
# pipes, the parent pinned to core $1 and the child to core $2.
pipe_pingpong() {
  python3 - "$1" "$2" "$N" <<'PY'
import os, sys, time
a, b, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r1, w1 = os.pipe(); r2, w2 = os.pipe()
if os.fork() == 0:
    os.close(w1); os.close(r2)  # so the parent's close ends the loop
    os.sched_setaffinity(0, {b})
    while os.read(r1, 1):
        os.write(w2, b"x")
    os._exit(0)
os.close(r1); os.close(w2)
os.sched_setaffinity(0, {a})
os.write(w1, b"x"); os.read(r2, 1)  # the child is up
t = time.perf_counter()
for _ in range(n):
    os.write(w1, b"x"); os.read(r2, 1)
print("%.1f" % ((time.perf_counter() - t) / n * 1e6))
os.close(w1); os.wait()
PY
}
"$E" umount "$W/ec"
taskset -c 0 "$E" mount "$W/back" "$W/ec" -o "cache_dir=$W/cache"
echo "the same stats with the efscache daemon pinned to core 0, and a pipe ping-pong between two processes:"
for placement in "one core (0 and 0):0" "two cores (0 and 1):1"; do
  name=${placement%%:*} cpu=${placement#*:}
  stats=$(for _ in 1 2 3; do forced_stats "$W/ec" "$cpu"; done | tr '\n' ' ')
  pings=$(for _ in 1 2 3; do pipe_pingpong 0 "$cpu"; done | tr '\n' ' ')
  printf '%-24s efscache stat %s  pipe round trip %s\n' "$name" "$stats" "$pings"
done
hp=/sys/module/haltpoll/parameters/guest_halt_poll_ns
[ -r "$hp" ] && echo "guest halt polling: guest_halt_poll_ns=$(cat "$hp") (0: idle virtual cores halt at once)"
