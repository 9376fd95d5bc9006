#!/usr/bin/env python3
"""A stand-in for a new spanvmm binary in live-update tests: it speaks the hand-over protocol
(docs/live-update.md) for real but misbehaves on purpose.

usage: fake_vmm.py MODE run --takeover-fd FD
  MODE=version        answers the offer with state version 999
  MODE=die-after-takeover  says Ready, receives the VM state, then dies without answering
  MODE=die-after-go   goes through the hand-over, takes the go-ahead, then dies without
                      confirming (the commit point has passed: the old process is in doubt)
  MODE=hang-with-child  starts a child process (its pid written to $FAKE_CHILD_PID_FILE), then
                      never answers the offer
"""
import json
import os
import socket
import struct
import sys


def read_frame(sock, first=b""):
    buf = first
    while len(buf) < 4:
        chunk = sock.recv(4 - len(buf))
        if not chunk:
            sys.exit(3)
        buf += chunk
    (length,) = struct.unpack("<I", buf[:4])
    body = buf[4:]
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            sys.exit(3)
        body += chunk
    return json.loads(body)


def send(sock, msg):
    body = json.dumps(msg).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)


def main():
    mode = sys.argv[1]
    fd = int(sys.argv[sys.argv.index("--takeover-fd") + 1])
    sock = socket.socket(fileno=fd)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
    for f in fds:
        os.close(f)
    offer = read_frame(sock, data)
    assert "Offer" in offer, offer
    if mode == "hang-with-child":
        child = os.fork()
        if child == 0:
            os.execvp("sleep", ["sleep", "600"])
        with open(os.environ["FAKE_CHILD_PID_FILE"], "w") as f:
            f.write(str(child))
        while True:
            sock.recv(1 << 16) or sys.exit(3)
    if mode == "version":
        send(sock, {"Ready": {"state_version": 999}})
        sock.recv(1)
        return
    send(sock, {"Ready": {"state_version": offer["Offer"]["state_version"]}})
    takeover = read_frame(sock)
    assert "Takeover" in takeover
    if mode == "die-after-go":
        send(sock, {"Restored": {"restore_us": 1}})
        go = read_frame(sock)
        assert go == "Go", go
        os._exit(1)  # the old process can no longer take the guest back
    os._exit(1)  # dies holding the guest's state, before restoring anything


main()
