#!/usr/bin/env python3
"""Independent DKIM verifier for Floodgate's tests: dkimpy (not Floodgate's mail-auth)
checks every DKIM-Signature of a message against the TXT records given on the command
line, without DNS.

    dkim_verify.py MESSAGE_FILE NAME=RECORD [NAME=RECORD ...]

Prints one line per signature, "pass d=DOMAIN s=SELECTOR a=ALGORITHM" or "fail ...",
and exits 0 when every signature passed, 1 otherwise, 2 on a usage error.
"""
import sys

import dkim


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    records = {}
    for arg in sys.argv[2:]:
        name, _, record = arg.partition("=")
        records[name.rstrip(".").lower()] = record.encode()

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.rstrip(".").lower())

    with open(sys.argv[1], "rb") as f:
        message = f.read()
    verifier = dkim.DKIM(message)
    count = sum(1 for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                if line.lower().startswith(b"dkim-signature:"))
    if count == 0:
        print("none")
        return 1
    ok = True
    for idx in range(count):
        passed = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        sig = verifier.signature_fields or {}
        d = sig.get(b"d", b"?").decode()
        s = sig.get(b"s", b"?").decode()
        a = sig.get(b"a", b"?").decode()
        print(f"{'pass' if passed else 'fail'} d={d} s={s} a={a}")
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
