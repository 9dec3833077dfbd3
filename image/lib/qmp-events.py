#!/usr/bin/env python3
"""Logs QEMU's QMP events (one JSON object per line) to a file until QEMU goes away.

    qmp-events.py SOCKET LOGFILE

Used to prove that a reset came from the watchdog: QEMU emits {"event": "WATCHDOG",
"data": {"action": "reset"}} when the i6300esb fires, and "RESET" for every reset.
"""
import json
import socket
import sys
import time

path, log = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"qmp-events.py: cannot connect to {path}")
        time.sleep(0.1)
f = s.makefile("rw")
f.readline()  # greeting
f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
f.flush()
with open(log, "a", buffering=1) as out:
    for line in f:
        msg = json.loads(line)
        if "event" in msg:
            out.write(json.dumps(msg) + "\n")
