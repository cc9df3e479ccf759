#!/usr/bin/env python3
"""Writes RESP SET commands for N keys whose names are 20-30 bytes long
(uniformly), for `redis-cli --pipe`. Deterministic: the same N gives the
same keys, so two servers get identical datasets."""
import random
import sys

n = int(sys.argv[1])
rng = random.Random(42)
out = sys.stdout.buffer
for i in range(n):
    length = rng.randint(20, 30)
    base = f"k:{i}:"
    key = (base + "x" * (length - len(base))).encode()
    out.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\nv\r\n" % (len(key), key))
