#!/usr/bin/env python3
"""Seeds for the fuzz targets: writes corpus/<target>/ under fuzz/ (see README.md).

    python3 seeds.py [SNAPSHOT_STATE_FILE]

Without a state file, vm_state and state_file get no seeds from a real VM; with one (the `state`
file of a snapshot layer, e.g. from `spanvmm ctl snapshot create --dir D`, then D/state), the
state file seeds state_file and the VM state inside its manifest seeds vm_state.
"""

import json
import os
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- migration_wire: every frame type, well formed (docs/migration-wire.md) ---
MAGIC = b"SPANMIG\0"


def frame(ty, payload):
    return struct.pack("<IB", len(payload), ty) + payload


def bitmap(words):
    return struct.pack("<I", len(words)) + b"".join(struct.pack("<Q", w) for w in words)


frames = {
    "hello": frame(1, MAGIC + struct.pack("<IQQB", 3, 256 << 20, 7, 0)),
    "welcome": frame(2, MAGIC + struct.pack("<I", 3)),
    "error": frame(3, b"wire version 1, this destination speaks 3"),
    # 70 pages, all zero markers: two words per bitmap, no data
    "pages-zero": frame(4, struct.pack("<QHB", 512, 70, 0) + struct.pack("<QQ", 2**64 - 1, 0x3F) * 2),
    # one data page
    "pages-data": frame(4, struct.pack("<QHB", 9, 3, 0) + struct.pack("<Q", 0b101) + struct.pack("<Q", 0b001) + b"\x5a" * 4096),
    "state": frame(5, b"\x01" + struct.pack("<I", 5) + b"state" + bitmap([1, 2, 3])),
    "resumed": frame(6, struct.pack("<Q", 1234)),
    "fault": frame(7, bitmap([4, 5, 6])),
    "done": frame(8, b""),
    "complete": frame(9, struct.pack("<QQQQ", 1, 2, 3, 4)),
    "needed": frame(10, bitmap([0xFF00FF])),
    "machine": frame(11, json.dumps({"mem_bytes": 256 << 20, "vcpus": 1, "tsc_khz": 2000000, "cmdline": ""}).encode()),
    "sync": frame(12, b""),
    "ready": frame(13, struct.pack("<Q", 99)),
    "commit": frame(14, b"\x01"),
}
for name, b in frames.items():
    # as a stream of one frame, and as type byte + payload
    put("migration_wire", "stream-" + name, b)
    put("migration_wire", "typed-" + name, b[4:5] + b[5:])
put("migration_wire", "stream-conversation", b"".join(frames[n] for n in ["hello", "welcome", "machine", "pages-zero", "sync", "state", "ready", "commit", "resumed"]))

# --- api_request: one request per endpoint (docs/api.yaml) ---
def req(method, path, body=b""):
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


requests = [
    ("GET", "/vm", b""),
    ("PUT", "/vm/pause", b""),
    ("PUT", "/vm/resume", b'{"force":true}'),
    ("PUT", "/vm/shutdown", b""),
    ("PUT", "/vm/save", b'{"dir":"/tmp/x"}'),
    ("PUT", "/guest/command", b'{"command":"verify"}'),
    ("PUT", "/vm/live-update", b'{"binary":"/usr/bin/spanvmm","timeout_ms":5000}'),
    ("PUT", "/vm/migrate", b'{"to":"tls://127.0.0.1:4000","plugin":"/p/precopy.wasm","tls_dir":"/t","max_bandwidth":1000000}'),
    ("PUT", "/vm/migrate", b'{"poll":3}'),
    ("GET", "/vm/migration", b""),
    ("PUT", "/snapshot/create", b'{"dir":"/tmp/s","live":true,"incremental_of":"/tmp/p"}'),
    ("PUT", "/snapshot/load", b'{"dir":"/tmp/s","lazy":true}'),
    ("PUT", "/snapshot/periodic", b'{"dir":"/tmp/s","keep":4}'),
    ("GET", "/snapshot/status", b""),
    ("GET", "/plugins", b""),
    ("GET", "/plugins/notifications", b""),
    ("PUT", "/plugins/attach", b'{"path":"/p/x.wasm","config":"a=1","async_port_writes":true}'),
    ("PUT", "/plugins/detach", b'{"name":"x"}'),
    ("PUT", "/plugins/replace", b'{"name":"x","path":"/p/y.wasm","rename":true}'),
    ("PUT", "/plugins/call", b'{"name":"x","method":"m","args":"{}"}'),
]
for i, (m, p, b) in enumerate(requests):
    put("api_request", f"req-{i:02}", req(m, p, b))

# --- manifest: manifests as a native plugin's describe returns them (mode byte 0) ---
manifests = [
    {"name": "exit-stats", "version": "1.0", "abi_version": 1, "events": ["port-write", "lifecycle", "tick"],
     "ports": [{"base": 0x3F8, "len": 8}], "capabilities": ["memory-read", "vcpu-state"], "tick_period_ms": 100},
    {"name": "mmio", "version": "0.1", "abi_version": 1, "events": ["mmio-read", "mmio-write"], "ports": [],
     "mmio": [{"base": 1 << 32, "len": 4096}], "capabilities": ["dirty-log", "drives-migration", "snapshot", "pause-resume", "memory-write"], "tick_period_ms": 0},
]
for i, m in enumerate(manifests):
    put("manifest", f"json-{i}", b"\x00" + json.dumps(m).encode())
put("manifest", "sha256", b"\x00" + b"ab" * 32)
put("manifest", "built", b"\x01" + bytes(range(64)))

# --- state_file / vm_state from a real snapshot layer's state file ---
if len(sys.argv) > 1:
    raw = open(sys.argv[1], "rb").read()
    put("state_file", "real", raw)
    payload = raw[48:]
    if struct.unpack("<I", raw[12:16])[0] & 1:
        sys.exit("an encrypted state file: its VM state cannot seed vm_state")
    jlen = struct.unpack("<I", payload[:4])[0]
    vm = json.loads(payload[4:4 + jlen])["vm"]
    vm_json = json.dumps(vm, separators=(",", ":")).encode()
    put("vm_state", "json", b"\x01" + vm_json)
    header = b"SPANVMST" + struct.pack("<IIQI", 1, 0, len(vm_json), zlib.crc32(vm_json))
    put("vm_state", "file", b"\x00" + header + vm_json)
