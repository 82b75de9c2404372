#!/bin/bash
# Recovery with many pending files: FILES files (default 100,000) in 100
# directories are created through a mount with debounce=1h (so all of them
# are pending state in the journal), the daemon is killed with SIGKILL, and
# efscache is mounted again over the same cache dir. Prints the time until
# the mount returns and until the first listing and stat answer, and how long
# publishing everything to the (local) backend takes afterwards.
# Usage: benches/recovery.sh [FILES]   (run as root; needs target/release/efscache)
set -euo pipefail
FILES=${1:-100000}
E=$(cd "$(dirname "$0")/.." && pwd)/target/release/efscache
W=$(mktemp -d /var/tmp/efscache-recovery.XXXXXX)
cleanup() {
  "$E" umount "$W/m" >/dev/null 2>&1 || umount -l "$W/m" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/b" "$W/m" "$W/c"
"$E" mount "$W/b" "$W/m" -o "cache_dir=$W/c,debounce=1h"
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
PID=$("$E" status --json "$W/m" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
"$E" status "$W/m" | grep -E "^(pending|journal)"
kill -9 "$PID"; sleep 0.5
t0=$(date +%s.%N)
"$E" mount "$W/b" "$W/m" -o "cache_dir=$W/c,debounce=1h"
t1=$(date +%s.%N)
n=$(ls -f "$W/m/d050" | wc -l)
s=$(stat -c %s "$W/m/d050/f00000")
t2=$(date +%s.%N)
echo "mount returned after $(echo "$t1 - $t0" | bc) s; first listing + stat after $(echo "$t2 - $t0" | bc) s ($((n - 2)) entries in d050, d050/f00000 has $s bytes)"
"$E" status --json "$W/m" | python3 -c 'import json,sys; print("recovery:", json.load(sys.stdin)["recovery"])'
t3=$(date +%s.%N)
"$E" sync "$W/m"
t4=$(date +%s.%N)
echo "publishing them all to the local backend (efscache sync): $(echo "$t4 - $t3" | bc) s; files on the backend: $(find "$W/b" -type f | wc -l)"
