"""SMTP sink of the end-to-end tests (kind-config/e2e.sh and tests/realpods): stores every
accepted message in DATA/<pid>-<n>.eml, records each transaction as one JSON line in
DATA/transactions.jsonl (client address, envelope, Subject, Received headers and the SHA-256 of
the body, by which the tests count every message), and answers 421 while DATA/paused exists (so
the relay queues mail). Python standard library only."""
import asyncio, hashlib, json, os, time

DATA = os.environ.get("SINK_DATA", "/data")
counter = 0

def paused():
    return os.path.exists(os.path.join(DATA, "paused"))


async def handle(reader, writer):
    global counter
    def send(line):
        writer.write((line + "\r\n").encode())
    if paused():
        send("421 4.3.2 sink paused, try again later")
        await writer.drain()
        writer.close()
        return
    send("220 smtp-sink ESMTP")
    await writer.drain()
    mail_from, rcpts = None, []
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = line.decode("utf-8", "replace").rstrip("\r\n")
        verb = cmd[:4].upper()
        if verb in ("EHLO", "HELO"):
            send("250-smtp-sink" if verb == "EHLO" else "250 smtp-sink")
            if verb == "EHLO":
                send("250-8BITMIME")
                send("250 SIZE 104857600")
        elif verb == "MAIL":
            # Paused also for a connection opened before (a relay keeps its connections).
            if paused():
                send("421 4.3.2 sink paused, try again later")
                await writer.drain()
                break
            mail_from, rcpts = cmd[10:], []
            send("250 2.1.0 ok")
        elif verb == "RCPT":
            rcpts.append(cmd[8:])
            send("250 2.1.5 ok")
        elif verb == "DATA":
            if mail_from is None or not rcpts:
                send("503 5.5.1 need MAIL and RCPT")
                await writer.drain()
                continue
            send("354 go ahead")
            await writer.drain()
            body = []
            while True:
                l = await reader.readline()
                if not l or l in (b".\r\n", b".\n"):
                    break
                if l.startswith(b".."):
                    l = l[1:]
                body.append(l)
            counter += 1
            name = os.path.join(DATA, "%d-%d.eml" % (os.getpid(), counter))
            with open(name + ".tmp", "wb") as f:
                f.write(("X-Sink-From: %s\r\nX-Sink-To: %s\r\n" % (mail_from, ",".join(rcpts))).encode())
                f.writelines(body)
                f.flush()
                os.fsync(f.fileno())
            os.rename(name + ".tmp", name)
            raw = b"".join(body)
            head, _, text = raw.partition(b"\r\n\r\n")
            headers = head.decode("utf-8", "replace").replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
            record = {
                "time": time.time(), "peer": writer.get_extra_info("peername")[0],
                "mail_from": mail_from, "rcpts": rcpts, "file": os.path.basename(name),
                "sha256": hashlib.sha256(text).hexdigest(),
                "subject": next((h[9:] for h in headers if h.lower().startswith("subject: ")), ""),
                "received": [h[10:] for h in headers if h.lower().startswith("received: ")],
            }
            with open(os.path.join(DATA, "transactions.jsonl"), "a") as journal:
                journal.write(json.dumps(record) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
            print("stored", name, mail_from, rcpts, flush=True)
            send("250 2.0.0 stored")
            mail_from, rcpts = None, []
        elif verb == "RSET":
            mail_from, rcpts = None, []
            send("250 2.0.0 ok")
        elif verb == "NOOP":
            send("250 2.0.0 ok")
        elif verb == "QUIT":
            send("221 2.0.0 bye")
            await writer.drain()
            break
        else:
            send("502 5.5.2 not implemented")
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(handle, os.environ.get("SINK_ADDRESS", "0.0.0.0"), int(os.environ.get("SINK_PORT", "2525")))
    print("smtp-sink listening", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
