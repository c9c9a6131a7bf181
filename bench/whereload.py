#!/usr/bin/env python3
"""bench/whereload.py: intake latency for bench/whereabouts.sh.

  whereload.py HOST PORT SECONDS RATE OUT.json [--window START END]

One SMTP session per worker (4 workers), each sending one-recipient messages at RATE/4
per second for SECONDS (or, with --window, until file END exists, counting only the
transactions begun after file START exists); records each transaction's time from MAIL
FROM to the 250 after the final dot, and writes count, p50, p99 and max (ms) to OUT.json.
"""
import json
import os
import smtplib
import sys
import threading
import time

host, port, seconds, rate, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
window = sys.argv[7:9] if len(sys.argv) > 8 and sys.argv[6] == "--window" else None
until = window[1] if window else None
WORKERS = 4
BODY = ("Subject: whereabouts bench\r\n\r\n" + ("x" * 76 + "\r\n") * 13).encode()
lat, lock, errors, first = [], threading.Lock(), [0], []


def done(start):
    if until:
        return os.path.exists(until)
    return time.monotonic() - start >= seconds


def worker(n):
    s = smtplib.SMTP(host, port, timeout=30)
    s.ehlo("load.test")
    start, i, gap = time.monotonic(), 0, WORKERS / rate
    while not done(start):
        due = start + i * gap
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        counted = not window or os.path.exists(window[0])
        t0 = time.monotonic()
        try:
            s.sendmail("load@client.bench.test", [f"w{n}-{i}@bench.test"], BODY)
            if counted:
                with lock:
                    lat.append(time.monotonic() - t0)
        except smtplib.SMTPException as e:
            with lock:
                errors[0] += 1
                first[:1] = first[:1] or [repr(e)]
        i += 1
    s.quit()


threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0
json.dump({"count": len(lat), "errors": errors[0], "p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0), "first_error": first[0] if first else None}, open(out, "w"))
