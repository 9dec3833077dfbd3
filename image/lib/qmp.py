#!/usr/bin/env python3
"""Sends QMP commands to a running QEMU and prints each answer; exits 1 on the first error.

    qmp.py SOCKET '{"execute": ..., "arguments": {...}}' ...

Used to plug a USB stick into a running device (blockdev-add + device_add) and to pull it out
again (device_del, then blockdev-del once the guest let go of it: DEVICE_DELETED).
"""
import json
import socket
import sys
import time


def main() -> int:
    path, commands = sys.argv[1], sys.argv[2:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    f = s.makefile("rw")
    f.readline()  # greeting
    pending = [{"execute": "qmp_capabilities"}] + [json.loads(c) for c in commands]
    for i, command in enumerate(pending):
        f.write(json.dumps(command) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "event" in msg:
                continue
            if "error" in msg:
                print(f"qmp.py: {command['execute']}: {msg['error'].get('desc')}", file=sys.stderr)
                return 1
            if i > 0:
                print(json.dumps(msg.get("return")))
            break
        if command["execute"] == "device_del":
            # The guest must release the device before its drive can go.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = json.loads(f.readline())
                if msg.get("event") == "DEVICE_DELETED" and msg["data"].get("device") == command["arguments"]["id"]:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
