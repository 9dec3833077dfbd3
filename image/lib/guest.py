#!/usr/bin/env python3
"""Runs one shell command inside the QEMU guest and prints its output; exits with its status.

The QEMU image starts a root shell on the virtio console when run-qemu.sh attaches one
(QEMU_SHELL=SOCKET). Each command is wrapped between two unique markers so output left over
from an earlier, interrupted command is never mistaken for this one's.

    guest.py SOCKET 'command' [--timeout SECONDS] [--no-wait]

--no-wait sends the command and returns at once (for commands that hang the guest).
Exit 255: no answer within the timeout (or the socket is gone).
"""
import argparse
import os
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("command")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--no-wait", action="store_true")
    a = ap.parse_args()

    tag = os.urandom(6).hex()
    begin, end = f"__begin_{tag}", f"__end_{tag}"
    # A subshell, so `exit` or `cd` in the command cannot end or change the guest shell.
    line = f"echo {begin}; ( {a.command}\n) </dev/null 2>&1; echo {end} $?\n"
    deadline = time.monotonic() + a.timeout
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(a.socket)
        s.sendall(line.encode())
        if a.no_wait:
            time.sleep(0.5)  # let QEMU hand the bytes to the guest before we hang up
            return 0
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("socket closed")
            buf += chunk
            text = buf.decode(errors="replace")
            i = text.find(begin + "\n")
            j = text.find(end + " ", i if i >= 0 else 0)
            if i >= 0 and j >= 0 and text.find("\n", j) >= 0:
                out = text[i + len(begin) + 1 : j]
                status = int(text[j + len(end) + 1 : text.find("\n", j)].strip())
                sys.stdout.write(out)
                return status
    except (OSError, TimeoutError, ConnectionError, ValueError) as e:
        print(f"guest.py: no answer from the guest shell at {a.socket} ({e or 'timeout'})", file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main())
