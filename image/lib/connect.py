#!/usr/bin/env python3
"""Joins one guest connection to a TCP address on the host: QEMU's user network runs it once per
connection the guest opens to a `guestfwd=tcp:IP:PORT-cmd:` address (image/run-qemu.sh,
QEMU_DEPOT), with that connection as its stdin, stdout and stderr.

    connect.py HOST PORT

Nothing may be written to stderr: it is the guest's connection too. Exits when both directions
have ended.
"""
import os
import socket
import sys
import threading


def pump(src, dst):
    """Copies src to dst until src ends, then ends dst's sending side."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main():
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    guest = socket.socket(fileno=os.dup(0))
    try:
        host = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    except OSError:
        return 1
    host.settimeout(None)
    there = threading.Thread(target=pump, args=(guest, host), daemon=True)
    there.start()
    pump(host, guest)
    there.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
