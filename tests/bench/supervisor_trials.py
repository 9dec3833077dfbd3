#!/usr/bin/env python3
"""Timed failure trials against a running edge-supervisor, observed through its control socket.

  supervisor_trials.py SOCKET crash|hang TRIALS

crash: kill -9 a replica; measure until its slot has a new process that is ready.
hang:  SIGSTOP a replica; measure until it is out of rotation, and until its replacement is ready.
Victims rotate over the replicas. Between trials it waits until every replica is ready and the
previous victim is gone. Prints p50/p99/max per measure, in milliseconds.
"""
import json
import os
import signal
import socket
import sys
import time

POLL = 0.001


def status(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b'{"command":"status"}\n')
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


def replica(st, rid):
    return next(r for r in st["replicas"] if r["id"] == rid)


def wait(path, cond, limit=60.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        st = status(path)
        if cond(st):
            return st
        time.sleep(POLL)
    raise SystemExit(f"condition not reached within {limit}s: {st}")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return ") Z " not in f.read()
    except OSError:  # gone between the open and the read, or already reaped
        return False


def pct(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[k]


def main():
    path, mode, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    st = wait(path, lambda s: s["ready"] == s["desired"] > 0)
    ids = [r["id"] for r in st["replicas"]]
    out_of_rotation, replaced = [], []
    for i in range(trials):
        rid = ids[i % len(ids)]
        st = wait(path, lambda s: s["ready"] == s["desired"])
        pid = replica(st, rid)["pid"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL if mode == "crash" else signal.SIGSTOP)
        if mode == "hang":
            wait(path, lambda s: not replica(s, rid)["ready"] or replica(s, rid)["pid"] != pid)
            out_of_rotation.append((time.monotonic() - t0) * 1000)
        wait(path, lambda s: replica(s, rid)["pid"] not in (None, pid) and replica(s, rid)["ready"])
        replaced.append((time.monotonic() - t0) * 1000)
        end = time.monotonic() + 30
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.005)
    for name, values in (("out of rotation", out_of_rotation), ("replacement ready", replaced)):
        if values:
            print(f"{mode} -> {name}: n={len(values)} p50={pct(values, 50):.1f}ms "
                  f"p99={pct(values, 99):.1f}ms max={max(values):.1f}ms")


if __name__ == "__main__":
    main()
