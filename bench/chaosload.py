#!/usr/bin/env python3
"""bench/chaosload.py: the clients of bench/chaos.sh (standard library only).

  load:  SESSIONS SMTP sessions and one HTTP client submit uniquely numbered messages
         (`Subject: chaos <number>`) until STOP exists, reconnecting whenever the daemon
         is down (it is being killed). A number is written to ACKED only once its message
         was acknowledged (250 after the final dot, or 202). A message whose answer never
         came is not counted and not retried under its number. Prints totals at the end.
  probe: one SMTP transaction and one HTTP request to fresh recipients; prints the SMTP
         reply codes (RCPT, DATA) and the HTTP status. With --until-ok S, repeats every
         50 ms until both are accepted (bounded by S seconds) and prints the elapsed time.

Talks to 127.0.0.1 only. Every loop is bounded by STOP or a deadline.
"""
import argparse
import itertools
import json
import os
import smtplib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def message(number):
    return (f"From: chaos@client.test\r\nTo: user@chaos.test\r\nSubject: chaos {number}\r\n"
            f"\r\nmessage {number}\r\n").encode()


def http_send(port, key, number, rcpt, timeout=5):
    body = json.dumps({"from": "chaos@client.test", "to": [rcpt],
                       "subject": f"chaos {number}", "text": f"message {number}"}).encode()
    req = urllib.request.Request(f"http://{HOST}:{port}/v1/messages", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return 0


class Load:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.acked = []
        self.errors = 0
        self.refused = 0

    def stopped(self):
        return os.path.exists(self.args.stop)

    def ack(self, number):
        with self.lock:
            self.acked.append(number)

    def smtp_worker(self, worker):
        numbers = (f"s{worker}-{n}" for n in itertools.count())
        while not self.stopped():
            try:
                with smtplib.SMTP(HOST, self.args.smtp, timeout=5) as s:
                    s.ehlo("chaos.client")
                    for _ in range(self.args.per_session):
                        if self.stopped():
                            break
                        number = next(numbers)
                        try:
                            s.sendmail("chaos@client.test", ["user@chaos.test"], message(number))
                            self.ack(number)
                        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError,
                                smtplib.SMTPSenderRefused):
                            with self.lock:
                                self.refused += 1
                            s.rset()
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.errors += 1
                time.sleep(0.05)

    def http_worker(self):
        for n in itertools.count():
            if self.stopped():
                return
            number = f"h-{n}"
            status = http_send(self.args.http, self.args.key, number, "user@chaos.test")
            if status == 202:
                self.ack(number)
            else:
                with self.lock:
                    self.errors += status == 0
                    self.refused += status != 0
                time.sleep(0.05)

    def run(self):
        threads = [threading.Thread(target=self.smtp_worker, args=(w,))
                   for w in range(self.args.sessions)]
        threads.append(threading.Thread(target=self.http_worker))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(self.args.acked, "w") as f:
            f.write("\n".join(self.acked) + ("\n" if self.acked else ""))
        print(f"acked={len(self.acked)} refused={self.refused} connection_errors={self.errors}")


def smtp_probe(port, rcpt, number):
    """(RCPT code, DATA code or 0) for one transaction."""
    try:
        with smtplib.SMTP(HOST, port, timeout=5) as s:
            s.ehlo("chaos.probe")
            s.mail("chaos@client.test")
            code, _ = s.rcpt(rcpt)
            if code != 250:
                s.rset()
                return code, 0
            code_d, _ = s.data(message(number))
            return code, code_d
    except smtplib.SMTPDataError as e:
        return 250, e.smtp_code
    except (OSError, smtplib.SMTPException):
        return 0, 0


def probe(args):
    start = time.time()
    deadline = start + (args.until_ok or 0)
    for n in itertools.count():
        tag = f"{args.tag}-{n}"
        if args.fresh is None:
            rcpt = http_rcpt = f"u@{args.domain}"
        else:
            # Two fresh numbered domains per probe (SMTP, HTTP); bench/chaos.sh declares 300.
            k = (args.fresh + 2 * n) % 300
            rcpt, http_rcpt = f"u@d{k}.{args.domain}", f"u@d{k + 1}.{args.domain}"
        rcpt_code, data_code = smtp_probe(args.smtp, rcpt, tag)
        status = http_send(args.http, args.key, tag + "h", http_rcpt)
        ok = data_code == 250 and status == 202
        print(f"t={time.time() - start:.3f} rcpt={rcpt_code} data={data_code} http={status}",
              flush=True)
        if not args.until_ok or ok:
            if args.until_ok:
                print(f"recovered_after={time.time() - start:.3f}")
            return
        if time.time() > deadline:
            print("recovered_after=timeout")
            return
        time.sleep(0.05)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("load", "probe"):
        s = sub.add_parser(name)
        s.add_argument("--smtp", type=int, required=True)
        s.add_argument("--http", type=int, required=True)
        s.add_argument("--key", required=True)
    load = sub.choices["load"]
    load.add_argument("--sessions", type=int, default=4)
    load.add_argument("--per-session", type=int, default=50)
    load.add_argument("--acked", required=True)
    load.add_argument("--stop", required=True)
    pr = sub.choices["probe"]
    pr.add_argument("--domain", default="chaos.test")
    pr.add_argument("--tag", default="probe")
    pr.add_argument("--fresh", type=int, default=None, metavar="K",
                    help="recipients at the numbered domains dK, dK+1, ... (never looked up before)")
    pr.add_argument("--until-ok", type=float, default=0)
    args = p.parse_args()
    socket.setdefaulttimeout(5)
    if args.cmd == "load":
        Load(args).run()
    else:
        probe(args)


if __name__ == "__main__":
    main()
