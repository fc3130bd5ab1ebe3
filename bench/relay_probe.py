#!/usr/bin/env python3
"""End-to-end latency probe for bench/node-relay.sh. Runs a tiny SMTP sink on SINK_PORT (the
relay routes probe.example there) and, beside the load, sends one 10 KiB message every 20 ms
through the relay at RELAY_PORT with the send time in a header. The sink records arrival
minus send time. Stops when STOPFILE exists (then waits up to 30 s for stragglers).
Prints "p50_ms p99_ms received sent"."""
import os, socket, sys, threading, time

relay_port, sink_port, stopfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lat, lock = [], threading.Lock()
pad = (b"x" * 78 + b"\r\n") * 126

def serve(conn):
    f = conn.makefile("rb")
    conn.sendall(b"220 probe-sink\r\n")
    while True:
        line = f.readline()
        if not line:
            return
        cmd = line.strip().upper()
        if cmd.startswith(b"EHLO"):
            conn.sendall(b"250-probe-sink\r\n250 PIPELINING\r\n")
        elif cmd == b"DATA":
            conn.sendall(b"354 go\r\n")
            sent = None
            while True:
                l = f.readline()
                if not l or l == b".\r\n":
                    break
                if l.startswith(b"X-Probe-Sent: "):
                    sent = float(l[14:].strip())
            if sent is not None:
                with lock:
                    lat.append((time.time() - sent) * 1000)
            conn.sendall(b"250 ok\r\n")
        elif cmd == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            return
        else:
            conn.sendall(b"250 ok\r\n")

def sink():
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", sink_port)); ls.listen(100)
    while True:
        c, _ = ls.accept()
        # Without this, the sink's separate replies to a pipelined MAIL/RCPT/DATA wait for the
        # relay's delayed ACK (Nagle): a 40 ms floor in every latency, whichever relay.
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()

def reply(f):
    while True:
        l = f.readline()
        if not l:
            raise EOFError
        if l[3:4] != b"-":
            return int(l[:3])

threading.Thread(target=sink, daemon=True).start()
time.sleep(0.2)
sent = 0
while not os.path.exists(stopfile):
    try:
        s = socket.create_connection(("127.0.0.1", relay_port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb"); reply(f)
        s.sendall(b"EHLO probe\r\n"); reply(f)
        msg = b"X-Probe-Sent: %.6f\r\nSubject: probe\r\n\r\n" % time.time() + pad
        s.sendall(b"MAIL FROM:<probe@example.com>\r\nRCPT TO:<p@probe.example>\r\nDATA\r\n")
        if reply(f) == 250 and reply(f) == 250 and reply(f) == 354:
            s.sendall(msg + b".\r\n")
            if reply(f) == 250:
                sent += 1
        s.sendall(b"QUIT\r\n"); s.close()
    except (OSError, EOFError):
        pass
    time.sleep(0.02)
end = time.time() + 30
while time.time() < end:
    with lock:
        if len(lat) >= sent:
            break
    time.sleep(0.1)
with lock:
    v = sorted(lat)
if not v:
    print("nan nan 0", sent)
else:
    print(f"{v[len(v)//2]:.1f} {v[min(len(v)-1, int(len(v)*0.99))]:.1f} {len(v)} {sent}")
