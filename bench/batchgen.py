#!/usr/bin/env python3
"""bench/batchgen.py: inputs and the individual-request client of bench/batch.sh.

  batchgen.py rows N               N NDJSON rows: even rows valid (u<i>@bench.test, distinct
                                   vars), odd rows alternately empty, malformed, NXDOMAIN
  batchgen.py invalid N            N NDJSON rows, none deliverable: in turn empty, malformed
                                   and at an NXDOMAIN domain (the incident's recipients)
  batchgen.py template             the batch template, a ~20 KB text body
  batchgen.py individual N PORT KEY
                                   N single-recipient POST /v1/messages (same mix, same
                                   body size) over 8 keep-alive connections; prints
                                   recipients per second
"""
import http.client, json, sys, threading, time

FILLER = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 360)[:20000]


def recipient(i):
    if i % 2 == 0:
        return f"u{i}@bench.test", {"name": f"Customer {i}", "code": i}
    kind = (i // 2) % 3
    if kind == 0:
        return "", {}
    if kind == 1:
        return f"not an address {i}", {}
    return f"x{i}@nxdomain.test", {"name": "x"}


def rows(n):
    out = sys.stdout
    for i in range(n):
        to, vars_ = recipient(i)
        out.write(json.dumps({"to": to, "vars": vars_}, separators=(",", ":")))
        out.write("\n")


def invalid(n):
    out = sys.stdout
    for i in range(n):
        to, vars_ = recipient(2 * i + 1)
        out.write(json.dumps({"to": to, "vars": vars_}, separators=(",", ":")))
        out.write("\n")


def template():
    print(json.dumps({
        "from": "Shop <news@shop.test>", "campaign": "bench-activation",
        "subject": "Hello {{ name }}",
        "text": "Dear {{ name }}, your code is {{ code }}.\n" + FILLER,
    }))


def individual(n, port, key):
    done = [0]
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def work(start):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(start, n, 8):
            to, vars_ = recipient(i)
            body = json.dumps({
                "from": "Shop <news@shop.test>", "to": [to], "campaign": "bench-individual",
                "subject": f"Hello {vars_.get('name', '')}",
                "text": f"Dear {vars_.get('name', '')}, your code is {vars_.get('code', '')}.\n" + FILLER,
            })
            conn.request("POST", "/v1/messages", body, headers)
            r = conn.getresponse()
            r.read()
            if r.status not in (202, 422, 400):
                raise SystemExit(f"unexpected status {r.status}")
        with lock:
            done[0] += 1

    t0 = time.time()
    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{n / (time.time() - t0):.0f}")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "rows":
        rows(int(sys.argv[2]))
    elif what == "invalid":
        invalid(int(sys.argv[2]))
    elif what == "template":
        template()
    elif what == "individual":
        individual(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(__doc__)
