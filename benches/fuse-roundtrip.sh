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

# Microseconds per forced stat of DIR/f0..f99, round robin, N calls.
forced_stats() {
  python3 - "$1" "$N" <<'PY'
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
