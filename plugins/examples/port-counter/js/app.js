// port-counter in JavaScript (ComponentizeJS): the example service of plugins/examples, the
// same as ../rust and ../python. Claims the ports of its config ({"base": 2768, "len": 1}),
// counts the guest's writes to them, answers `stats` with JSON, and hands its count to a
// successor on replace (state {"writes": N, "last": V}, shared by all three languages).
// WIT u64 values are BigInts here.

import { claimPorts } from "spanvmm:service/host@0.1.0";

const ABI_VERSION = 1; // spanvmm_sdk::ABI_VERSION: the host refuses any other

let writes = 0n;
let last = 0n;

export function describe() {
  return {
    name: "port-counter",
    version: "0.1.0",
    abiVersion: ABI_VERSION,
    events: ["port-write"],
    ports: [],
    mmio: [],
    capabilities: [],
    tickPeriodMs: 0,
  };
}

export function attach(config) {
  let cfg;
  try {
    cfg = JSON.parse(config);
  } catch (e) {
    throw `config is not JSON: ${e}`;
  }
  if (!Number.isInteger(cfg.base)) throw 'config: "base" must be a number';
  try {
    claimPorts(cfg.base, cfg.len ?? 1);
  } catch (e) {
    throw e.payload ?? String(e); // the host's reason, refusing the attach
  }
}

export function onEvent(ev) {
  if (ev.tag === "port-write") {
    writes += 1n;
    last = ev.val.value;
  }
  return { tag: "none" };
}

const toJson = (extra) =>
  JSON.stringify({ ...extra, writes: Number(writes), last: Number(last) });

export function detach() {
  return new TextEncoder().encode(toJson({}));
}

export function resumeFrom(state) {
  let old;
  try {
    old = JSON.parse(new TextDecoder().decode(state));
  } catch (e) {
    throw `bad state: ${e}`;
  }
  writes += BigInt(old.writes);
  last = BigInt(old.last);
}

export function call(method, _args) {
  if (method === "stats") return toJson({ language: "javascript" });
  throw `unknown method ${JSON.stringify(method)}`;
}
