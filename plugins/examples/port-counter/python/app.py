"""port-counter in Python (componentize-py): the example service of plugins/examples, the same
as ../rust and ../js. Claims the ports of its config ({"base": 2768, "len": 1}), counts the
guest's writes to them, answers `stats` with JSON, and hands its count to a successor on replace
(state {"writes": N, "last": V}, shared by all three languages)."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import host, types

ABI_VERSION = 1  # spanvmm_sdk::ABI_VERSION: the host refuses any other


# Module state: lives as long as the component instance (componentize-py may make a new
# WitWorld object per call).
counts = {"writes": 0, "last": 0}


class WitWorld(wit_world.WitWorld):

    def describe(self) -> types.Manifest:
        return types.Manifest(
            name="port-counter",
            version="0.1.0",
            abi_version=ABI_VERSION,
            events=[types.EventKind.PORT_WRITE],
            ports=[],
            mmio=[],
            capabilities=[],
            tick_period_ms=0,
        )

    def attach(self, config: str) -> None:
        try:
            cfg = json.loads(config)
            base, length = int(cfg["base"]), int(cfg.get("len", 1))
        except (ValueError, KeyError, TypeError) as e:
            raise Err(f"config: {e!r}")
        host.claim_ports(base, length)  # raises Err(message) when taken: refuses the attach

    def on_event(self, ev: types.Event) -> types.EventReply:
        if isinstance(ev, types.Event_PortWrite):
            counts["writes"] += 1
            counts["last"] = ev.value.value
        return types.EventReply_None_()

    def detach(self) -> bytes:
        return json.dumps(counts).encode()

    def resume_from(self, state: bytes) -> None:
        try:
            old = json.loads(state)
            counts["writes"] += int(old["writes"])
            counts["last"] = int(old["last"])
        except (ValueError, KeyError, TypeError) as e:
            raise Err(f"bad state: {e!r}")

    def call(self, method: str, args: str) -> str:
        if method == "stats":
            return json.dumps({"language": "python", **counts})
        raise Err(f"unknown method {method!r}")
