"""Sends test mail for the end-to-end tests (kind-config/e2e.sh, tests/realpods). Python standard
library only.

send.py HOST PORT COUNT PREFIX [--sessions N] [--journal FILE] [--size BYTES] [--rcpt ADDR]
  Sends COUNT messages with subjects PREFIX-1..COUNT to someone@external.example (or --rcpt),
  over N sessions side by side (one connection per message, as most devices send). Each body is
  unique; with --journal, every message is recorded as one JSON line with the SHA-256 of its
  body (what the sink records too) and its result: "accepted" (250), "refused" (5xx) or
  "failed" (4xx, or the connection failed: the outcome may be unknown to the client, e.g. a
  connection lost after the final dot), so that a test can count every accepted message at the
  sink. SIGTERM stops it after the messages in flight. Prints one line per message; exits 0
  when every message sent was accepted, 3 when every one was refused with a 5xx, 1 otherwise.
"""
import argparse, hashlib, json, os, signal, smtplib, sys, threading

p = argparse.ArgumentParser()
p.add_argument("host")
p.add_argument("port", type=int)
p.add_argument("count", type=int)
p.add_argument("prefix")
p.add_argument("--sessions", type=int, default=1)
p.add_argument("--journal")
p.add_argument("--size", type=int, default=200, help="approximate body size in bytes")
p.add_argument("--rcpt", default="someone@external.example")
p.add_argument("--timeout", type=float, default=30)
args = p.parse_args()

lock = threading.Lock()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
counts = {"accepted": 0, "refused": 0, "failed": 0}
journal = open(args.journal, "a") if args.journal else None
next_index = iter(range(1, args.count + 1))


def one(i):
    subject = "%s-%d" % (args.prefix, i)
    token = os.urandom(8).hex()
    line = (subject + " " + token + " ").encode()
    body = (line * (args.size // len(line) + 1))[: max(args.size, len(line))].decode() + "\r\n"
    msg = "From: e2e@client.example\r\nTo: %s\r\nSubject: %s\r\n\r\n%s" % (args.rcpt, subject, body)
    try:
        with smtplib.SMTP(args.host, args.port, timeout=args.timeout) as s:
            s.sendmail("e2e@client.example", [args.rcpt], msg)
        result = "accepted"
    except smtplib.SMTPRecipientsRefused as e:
        codes = [c for c, _ in e.recipients.values()]
        result = "refused" if all(500 <= c < 600 for c in codes) else "failed"
        print(result, subject, e.recipients, flush=True)
    except smtplib.SMTPResponseException as e:
        result = "refused" if 500 <= e.smtp_code < 600 else "failed"
        print(result, subject, e.smtp_code, e.smtp_error, flush=True)
    except (OSError, smtplib.SMTPException) as e:
        result = "failed"
        print("failed", subject, repr(e), flush=True)
    with lock:
        counts[result] += 1
        if result == "accepted":
            print("accepted", subject, flush=True)
        if journal:
            record = {"subject": subject, "sha256": hashlib.sha256(body.encode()).hexdigest(),
                      "result": result}
            journal.write(json.dumps(record) + "\n")
            journal.flush()


def worker():
    while not stop.is_set():
        with lock:
            i = next(next_index, None)
        if i is None:
            return
        one(i)


threads = [threading.Thread(target=worker) for _ in range(max(1, args.sessions))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("sent: %(accepted)d accepted, %(refused)d refused, %(failed)d failed" % counts, flush=True)
total = sum(counts.values())
sys.exit(0 if counts["accepted"] == total else 3 if counts["refused"] == total else 1)
