#!/bin/bash
# Recovery with many pending files. FILES files (default 100,000) in 100
# directories are created through a mount, the daemon is killed with
# SIGKILL, and efscache is mounted again over the same cache dir. Prints the
# time until the mount returns (the overlay is rebuilt from the journal
# before the first reply), until an untouched directory answers, until a
# directory with recovered work answers (listing + stat), and until the
# backend has caught up (`efscache sync`).
#
#   default: debounce=1h, so every file is pending *state* in the journal
#            (taken back without a backend op per file).
#   --ops:   every publish is queued (the backend refuses creates until the
#            kill), so recovery re-queues one publish per file, and the new
#            mount's backend costs 1 ms per request (fault_delay).
#
# Usage: benches/recovery.sh [FILES] [--ops]   (as root; needs target/release/efscache)
set -euo pipefail
FILES=100000 MODE=state
for a in "$@"; do
  case "$a" in
    --ops) MODE=ops ;;
    *) FILES=$a ;;
  esac
done
E=$(cd "$(dirname "$0")/.." && pwd)/target/release/efscache
W=$(mktemp -d /var/tmp/efscache-recovery.XXXXXX)
cleanup() {
  "$E" umount "$W/m" >/dev/null 2>&1 || umount -l "$W/m" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/b/untouched" "$W/m" "$W/c"
echo hello > "$W/b/untouched/file"
if [ "$MODE" = ops ]; then
  FIRST="debounce=0ms,fault_rate=1,fault_ops=create,fault_errno=EIO"
  SECOND="fault_delay=1ms"
else
  FIRST="debounce=1h"
  SECOND="debounce=1h"
fi
"$E" mount "$W/b" "$W/m" -o "cache_dir=$W/c,$FIRST"
python3 - "$W/m" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per = max(1, n // 100)
for i in range(n):
    d = f"{root}/d{i // per:03}"
    if i % per == 0:
        os.mkdir(d)
    with open(f"{d}/f{i % per:05}", "wb") as fh:
        fh.write(b"x" * (1 + (i * 37) % 4000))
PY
if [ "$MODE" = ops ]; then
  # Every publish queued (retrying) before the kill.
  for _ in $(seq 600); do
    q=$("$E" status --json "$W/m" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queued_ops"])')
    [ "$q" -ge "$FILES" ] && break
    sleep 0.1
  done
fi
PID=$("$E" status --json "$W/m" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
"$E" status "$W/m" | grep -E "^(pending|queued|journal)" || true
kill -9 "$PID"; sleep 0.5
t0=$(date +%s.%N)
"$E" mount "$W/b" "$W/m" -o "cache_dir=$W/c,$SECOND"
t1=$(date +%s.%N)
cat "$W/m/untouched/file" >/dev/null
t2=$(date +%s.%N)
queued=$("$E" status --json "$W/m" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queued_ops"])')
n=$(ls -f "$W/m/d050" | wc -l)
s=$(stat -c %s "$W/m/d050/f00000")
t3=$(date +%s.%N)
"$E" sync "$W/m"
t4=$(date +%s.%N)
echo "mode $MODE, $FILES files:"
echo "  mount returned after $(echo "$t1 - $t0" | bc) s"
echo "  untouched directory read after $(echo "$t2 - $t0" | bc) s ($queued ops still queued then)"
echo "  recovered directory listed + stat'ed after $(echo "$t3 - $t0" | bc) s ($((n - 2)) entries in d050, d050/f00000 has $s bytes)"
echo "  backend caught up (efscache sync returned) after $(echo "$t4 - $t0" | bc) s; files on the backend: $(find "$W/b" -type f | wc -l)"
"$E" status --json "$W/m" | python3 -c 'import json,sys; r=json.load(sys.stdin)["recovery"]; r.pop("failures", None); print("  recovery:", r)'
