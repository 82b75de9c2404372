#!/usr/bin/env python3
"""The benchmarks' small-file tree: gen-tree.py ROOT FILES DIRS.

FILES files spread round robin over DIRS directories (d000, d001, ...),
sizes log-uniform between 1 and 64 KiB (most files small, a tail of larger
ones), each ending in its own number so no two are equal. Fixed seed: the
same tree every run.
"""
import os
import random
import sys

root, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42)
blob = rng.randbytes(64 * 1024) if hasattr(rng, "randbytes") else os.urandom(64 * 1024)
for i in range(d):
    os.makedirs(os.path.join(root, "d%03d" % i), exist_ok=True)
for i in range(n):
    size = int(1024 * 2 ** rng.uniform(0, 6))
    off = rng.randrange(0, 64 * 1024 - size + 1)
    with open(os.path.join(root, "d%03d" % (i % d), "f%06d.dat" % i), "wb") as f:
        f.write(blob[off:off + size] + i.to_bytes(8, "little"))
