#!/usr/bin/env python3
"""bench/chaossink.py: a receiving SMTP server for bench/chaos.sh that records every
message it accepts by its number.

Speaks enough ESMTP for Floodgate's client (EHLO with PIPELINING, 8BITMIME, SIZE,
ENHANCEDSTATUSCODES; MAIL, RCPT, DATA, RSET, NOOP, QUIT). For each message it accepts
it appends one line to OUT: the number from the message's `Subject: chaos <number>`
header (or `-` when there is none) and the time (seconds since the epoch), flushed
before the 250 is sent, so the file is what the sink has taken responsibility for. Listens on 127.0.0.1 only; bounded lines.

Usage: chaossink.py PORT OUT
"""
import asyncio
import re
import sys
import time

MAX_LINE = 1 << 16
SUBJECT = re.compile(rb"^Subject: chaos (\S+)\r?$", re.M | re.I)


async def session(reader, writer, out):
    async def reply(text):
        writer.write(text.encode() + b"\r\n")
        await writer.drain()

    await reply("220 chaos.sink ESMTP")
    in_tx = False
    rcpts = 0
    try:
        while True:
            line = await reader.readline()
            if not line or len(line) > MAX_LINE:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                in_tx, rcpts = False, 0
                await reply("250-chaos.sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                            "250-SIZE 10485760\r\n250 ENHANCEDSTATUSCODES")
            elif verb == b"MAIL":
                in_tx, rcpts = True, 0
                await reply("250 2.1.0 OK")
            elif verb == b"RCPT":
                if in_tx:
                    rcpts += 1
                    await reply("250 2.1.5 OK")
                else:
                    await reply("503 5.5.1 MAIL first")
            elif verb == b"DATA":
                if not in_tx or rcpts == 0:
                    await reply("554 5.5.1 No valid recipients")
                    continue
                await reply("354 go ahead")
                data = bytearray()
                while True:
                    l = await reader.readline()
                    if not l:
                        return
                    if l in (b".\r\n", b".\n"):
                        break
                    if len(data) < 1 << 20:
                        data += l
                m = SUBJECT.search(bytes(data))
                number = m.group(1).decode(errors="replace") if m else "-"
                out.write(f"{number} {time.time():.6f}\n")
                out.flush()
                in_tx = False
                await reply("250 2.0.0 OK")
            elif verb == b"RSET":
                in_tx, rcpts = False, 0
                await reply("250 2.0.0 OK")
            elif verb == b"NOOP":
                await reply("250 2.0.0 OK")
            elif verb == b"QUIT":
                await reply("221 2.0.0 Bye")
                return
            else:
                await reply("502 5.5.2 Command not implemented")
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def main(port, path):
    with open(path, "a", buffering=1) as out:
        server = await asyncio.start_server(
            lambda r, w: session(r, w, out), "127.0.0.1", port, limit=MAX_LINE * 2)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
