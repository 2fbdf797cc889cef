#!/usr/bin/env python3
"""One-way delay for the WAN benchmark (scripts/bench/wan.sh): the client
end of the veth link, in the client's network namespace.

netem is missing on this kernel, so this process is the delay: it owns the
client end of the veth (no address on it) at layer 2 through a packet
socket, and gives the client its address on a TUN device. Every IP packet,
in either direction, is held for DELAY seconds, then passed on in order:

    server ns: s0 --veth (tbf rate)--> c0 [packet socket] -> hold -> TUN -> client
    client   : TUN -> hold -> [packet socket] c0 --veth (tbf rate)--> s0

It forwards packets, not bytes of a connection (not a TCP proxy): TCP
sees the whole round trip, its own losses and its own window.

usage: wan_delay.py VETH TUN DELAY_MS SERVER_MAC
"""
import fcntl
import heapq
import os
import select
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def main():
    veth, tun_name, delay_ms, server_mac = sys.argv[1:5]
    delay = float(delay_ms) / 1000.0
    dst = bytes.fromhex(server_mac.replace(":", ""))
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", tun_name.encode(), IFF_TUN | IFF_NO_PI))
    pk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    pk.bind((veth, ETH_P_ALL))
    pk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    src = pk.getsockname()[4]
    eth = dst + src + b"\x08\x00"
    os.set_blocking(tun, False)
    pk.setblocking(False)
    # (due, seq, to_tun, bytes); seq keeps order among equal due times.
    held = []
    seq = 0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, to_tun, pkt = heapq.heappop(held)
            try:
                if to_tun:
                    os.write(tun, pkt)
                else:
                    pk.send(eth + pkt)
            except (BlockingIOError, OSError):
                pass  # a full queue drops the packet, as a router would
        timeout = max(0.0, held[0][0] - now) if held else 1.0
        ready, _, _ = select.select([tun, pk], [], [], timeout)
        now = time.monotonic()
        if tun in ready:
            for _ in range(64):
                try:
                    pkt = os.read(tun, 65536)
                except BlockingIOError:
                    break
                if pkt and pkt[0] >> 4 == 4:
                    heapq.heappush(held, (now + delay, seq, False, pkt))
                    seq += 1
        if pk in ready:
            for _ in range(64):
                try:
                    frame, addr = pk.recvfrom(65536)
                except BlockingIOError:
                    break
                # Only IPv4 arriving from the server (not what we send).
                if addr[2] == PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                    continue
                heapq.heappush(held, (now + delay, seq, True, frame[14:]))
                seq += 1


if __name__ == "__main__":
    main()
