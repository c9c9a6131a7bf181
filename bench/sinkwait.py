#!/usr/bin/env python3
"""bench/sinkwait.py: wait until smtp-sink -c has counted N messages, print when.

smtp-sink -c writes "sess=A quit=B mesg=C\r" to its stdout each time a session ends, a
QUIT is executed or a message's "." is received. This reads the tail of that file every
5 ms and prints the wall-clock time (seconds since the epoch) at which mesg first reached
N, then the count. Bounded: gives up after TIMEOUT seconds (prints "timeout" and the count).

Usage: sinkwait.py FILE N TIMEOUT
"""
import os, re, sys, time

path, target, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
pat = re.compile(rb"mesg=(\d+)")
deadline = time.time() + timeout
count = 0
while True:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64))
            found = pat.findall(f.read())
            if found:
                count = int(found[-1])
    except FileNotFoundError:
        pass
    now = time.time()
    if count >= target:
        print(f"{now:.6f} {count}")
        break
    if now > deadline:
        print(f"timeout {count}")
        break
    time.sleep(0.005)
