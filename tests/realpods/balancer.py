"""A TCP load balancer that speaks the PROXY protocol to its backend, as an HAProxy or a cloud
balancer with proxy protocol on does: it accepts clients on --listen and connects to the target
named in --routes-file ("HOST PORT v1|v2", read for every connection), first sending a PROXY
header with the client's address, then relaying bytes both ways. Python standard library only.
"""
import argparse
import asyncio
import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version, src, dst):
    (sip, sport), (dip, dport) = src[:2], dst[:2]
    if version == "v1":
        return f"PROXY TCP4 {sip} {dip} {sport} {dport}\r\n".encode()
    addresses = ipaddress.ip_address(sip).packed + ipaddress.ip_address(dip).packed
    addresses += struct.pack("!HH", sport, dport)
    # Version 2, PROXY command; TCP over IPv4.
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass


async def handle(client_reader, client_writer, routes_file):
    try:
        with open(routes_file) as f:
            host, port, version = f.read().split()
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
    except (OSError, ValueError) as e:
        print("no backend:", e, flush=True)
        client_writer.close()
        return
    up_writer.write(proxy_header(version, client_writer.get_extra_info("peername"),
                                 up_writer.get_extra_info("peername")))
    await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))
    for w in (up_writer, client_writer):
        w.close()


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, help="ADDRESS:PORT")
    p.add_argument("--routes-file", required=True)
    args = p.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(lambda r, w: handle(r, w, args.routes_file), host, int(port))
    print("balancer listening on", args.listen, flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
