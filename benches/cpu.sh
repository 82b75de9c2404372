#!/bin/bash
# How the daemon's use of the CPUs changes an rsync through efscache on a
# machine with few cores: the flush workers' priority (mount option
# flush_nice) and where the threads that answer the kernel run (fuse_cpus,
# with rsync started on the same CPU).
#
# On efs-sim (default profile efs-typical) rsync -a copies a generated tree
# of FILES small files (1-64 KiB, 100 dirs) into efscache, then `efscache
# sync` waits until it is all on the backend. Each repetition runs, back to
# back and in turns: rsync to local disk (unpinned, then on CPU 0), then
# efscache in each variant. It prints every run, then the medians: seconds
# until rsync returned, until the copy was durable on the backend, and of
# the first no-change re-sync after it (rsync's quick check).
#
# Usage: benches/cpu.sh [--files N] [--reps N] [--profile NAME] [--dir PATH]
#                       [--variant "LABEL;MOUNT OPTIONS;RSYNC CPU"]...
#   --dir PATH puts the work directory (tree, local copy, backend, cache)
#   under PATH (default /var/tmp); /dev/shm takes the disk out of the figures.
#   --variant replaces the default variants (any number of them); RSYNC CPU
#   is a CPU to start rsync on with taskset, or - for anywhere. Default:
#     "flush_nice=0;flush_nice=0;-"  "default;;-"  "fuse_cpus=0;fuse_cpus=0;0"
# As root; needs target/release/efscache and target/release/efs-sim.
set -euo pipefail
FILES=5000 REPS=5 PROFILE=efs-typical BASE=/var/tmp VARIANTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --files) FILES=$2; shift ;;
    --reps) REPS=$2; shift ;;
    --profile) PROFILE=$2; shift ;;
    --dir) BASE=$2; shift ;;
    --variant) VARIANTS+=("$2"); shift ;;
    *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
  shift
done
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=("flush_nice=0;flush_nice=0;-" "default;;-" "fuse_cpus=0;fuse_cpus=0;0")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
E=$ROOT/target/release/efscache S=$ROOT/target/release/efs-sim
[ -x "$E" ] && [ -x "$S" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
W=$(mktemp -d "$BASE/efscache-cpu.XXXXXX")
SIM_PID=""
cleanup() {
  "$E" umount "$W/ec" >/dev/null 2>&1 || umount -l "$W/ec" 2>/dev/null || true
  if [ -n "$SIM_PID" ]; then kill -TERM "$SIM_PID" 2>/dev/null || true; sleep 0.5; fi
  if awk -v m="$W/sim" '$5==m{f=1} END{exit !f}' /proc/self/mountinfo; then umount -l "$W/sim"; fi
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/src" "$W/back" "$W/sim" "$W/local" "$W/ec"

python3 "$ROOT/benches/gen-tree.py" "$W/src" "$FILES" 100

"$S" --profile "$PROFILE" --daemon "$W/back" "$W/sim" > "$W/sim.out" 2> "$W/sim.err" &
for _ in $(seq 100); do
  SIM_PID=$(head -1 "$W/sim.out" 2>/dev/null | tr -dc 0-9)
  [ -n "$SIM_PID" ] && break
  sleep 0.05
done
[ -n "$SIM_PID" ] || { echo "efs-sim did not start: $(cat "$W/sim.err")" >&2; exit 1; }

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
median() { sort -g | awk '{v[NR]=$1} END{if(NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'; }

# Copies are moved aside, not deleted, until the end: on ext4 without a
# journal, creating files is slow for minutes after many were deleted
# (docs/BENCHMARKS.md), which would slow whichever variant came next.
mkdir -p "$W/aside"
set_aside() { mv "$1" "$W/aside/$(date +%s%N)"; }
pin() { if [ "$1" = - ]; then "${@:2}"; else taskset -c "$1" "${@:2}"; fi; }
echo "rsync -a of $FILES files through efscache on efs-sim --profile $PROFILE, work dir under $BASE; seconds"
for r in $(seq "$REPS"); do
  line="rep $r:"
  for cpu in - 0; do
    sync; t0=$(now)
    pin "$cpu" rsync -a "$W/src/" "$W/local/r$r/"
    t1=$(now); echo "$(secs "$t0" "$t1")" >> "$W/local.$cpu"
    pin "$cpu" rsync -a "$W/src/" "$W/local/r$r/"
    t2=$(now); echo "$(secs "$t1" "$t2")" >> "$W/local-resync.$cpu"
    line="$line local$([ "$cpu" = - ] || echo " (rsync on CPU $cpu)") $(secs "$t0" "$t1") re-sync $(secs "$t1" "$t2")"
    set_aside "$W/local/r$r"
  done
  for v in $(seq 0 $((${#VARIANTS[@]} - 1))); do
    IFS=';' read -r label opts cpu <<< "${VARIANTS[$v]}"
    [ -e "$W/cache" ] && set_aside "$W/cache"
    "$E" mount "$W/sim" "$W/ec" -o "cache_dir=$W/cache${opts:+,$opts}"
    sync; t0=$(now)
    pin "$cpu" rsync -a "$W/src/" "$W/ec/r$r-$v/"
    t1=$(now)
    "$E" sync "$W/ec"
    t2=$(now)
    pin "$cpu" rsync -a "$W/src/" "$W/ec/r$r-$v/"
    t3=$(now)
    "$E" umount "$W/ec"
    echo "$(secs "$t0" "$t1")" >> "$W/ret.$v"; echo "$(secs "$t0" "$t2")" >> "$W/dur.$v"
    echo "$(secs "$t2" "$t3")" >> "$W/resync.$v"
    line="$line | $label: returns $(secs "$t0" "$t1") durable $(secs "$t0" "$t2") re-sync $(secs "$t2" "$t3")"
    set_aside "$W/back/r$r-$v"
  done
  echo "$line"
done
local_any=$(median < "$W/local.-") local0=$(median < "$W/local.0")
resync_any=$(median < "$W/local-resync.-") resync0=$(median < "$W/local-resync.0")
echo "medians of $REPS: local disk $local_any, re-sync $resync_any (rsync on CPU 0: $local0, re-sync $resync0)"
for v in $(seq 0 $((${#VARIANTS[@]} - 1))); do
  IFS=';' read -r label opts cpu <<< "${VARIANTS[$v]}"
  ret=$(median < "$W/ret.$v") dur=$(median < "$W/dur.$v") rs=$(median < "$W/resync.$v")
  [ "$cpu" = - ] && cpu=any
  printf '  %-14s -o %-22s rsync on CPU %-3s: returns %s (%sx local), durable %s, first re-sync %s (%sx local)\n' \
    "$label" "${opts:-(defaults)}" "$cpu" "$ret" "$(awk -v a="$ret" -v b="$local_any" 'BEGIN{printf "%.2f", a/b}')" "$dur" \
    "$rs" "$(awk -v a="$rs" -v b="$resync_any" 'BEGIN{printf "%.2f", a/b}')"
done
