#!/usr/bin/env python3
"""Latency probe for bench/node-accept.sh: one SMTP session that sends 10 KiB messages back
to back for DURATION seconds (or until STOPFILE exists) and records, per message, the time
from sending the final "." line to receiving the 250. Prints "p50_ms p99_ms count"."""
import socket, sys, time, os

host, port, duration, stopfile = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
body = b"Subject: probe\r\n\r\n" + (b"x" * 78 + b"\r\n") * 128  # ~10 KiB

def reply(f):
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])

s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
reply(f)
s.sendall(b"EHLO probe.example\r\n"); reply(f)
lat = []
end = time.time() + duration
while time.time() < end and not os.path.exists(stopfile):
    s.sendall(b"MAIL FROM:<probe@example.com>\r\n"); assert reply(f) == 250
    s.sendall(b"RCPT TO:<sink@example.net>\r\n"); assert reply(f) == 250
    s.sendall(b"DATA\r\n"); assert reply(f) == 354
    s.sendall(body)
    t = time.perf_counter()
    s.sendall(b".\r\n")
    code = reply(f)
    lat.append(time.perf_counter() - t)
    assert code == 250, code
s.sendall(b"QUIT\r\n")
lat.sort()
if not lat:
    print("nan nan 0")
else:
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
    print(f"{p(0.50):.2f} {p(0.99):.2f} {len(lat)}")
