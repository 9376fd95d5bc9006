//! The kernel command line: space-separated `key=value` (docs/spanguest-abi.md).

/// `workload=` names, as bits.
pub const IDLE: u32 = 1 << 0;
/// Rewrite the working set at `rate` pages/s.
pub const DIRTY: u32 = 1 << 1;
/// Re-check every written page every `verify_ms`.
pub const VERIFY: u32 = 1 << 2;
/// Fill `shared_mib` from a fixed seed.
pub const SHARED: u32 = 1 << 3;
/// Populate one page per MiB only.
pub const ZERO: u32 = 1 << 4;
/// Port-write storm.
pub const EXITS: u32 = 1 << 5;
/// MMIO-write storm (measured like `exits`).
pub const MMIO: u32 = 1 << 6;
/// Write, flush and re-read disk blocks on the first virtio-blk device.
pub const DISK: u32 = 1 << 7;

/// Serve the Redis protocol on the first virtio-net device (`ip=` needed).
pub const KV: u32 = 1 << 8;
/// Load a `kv` server (`peer=`) over the first virtio-net device (`ip=` needed).
pub const KVLOAD: u32 = 1 << 9;

const WORKLOADS: [(&str, u32); 10] = [
    ("idle", IDLE),
    ("dirty", DIRTY),
    ("verify", VERIFY),
    ("shared", SHARED),
    ("zero", ZERO),
    ("exits", EXITS),
    ("mmio", MMIO),
    ("disk", DISK),
    ("kv", KV),
    ("kvload", KVLOAD),
];

/// Most `virtio_mmio.device=` words kept.
pub const MAX_DEVICES: usize = crate::virtio::MAX_DEVICES;
/// Largest `disk_mib` (the generation array is static).
pub const MAX_DISK_MIB: u64 = 256;

/// Largest `mib` accepted: the static page tables map 64 GiB.
const MAX_MIB: u64 = 64 << 10;

/// The parameters, as given (defaults filled in; sizes not yet checked against RAM).
#[derive(Clone, Copy)]
pub struct Config {
    /// Bit set of the workloads above.
    pub workloads: u32,
    /// Resident MiB the workload populates, all vCPUs together.
    pub mib: u64,
    /// Working set `dirty` rewrites, MiB; `None` = all of the unique region.
    pub wss: Option<u64>,
    /// Pages/s `dirty` rewrites, all vCPUs together; 0 = flat out.
    pub rate: u64,
    /// Bytes written per touch.
    pub write: u64,
    /// Per-VM seed of the pattern.
    pub seed: u64,
    /// `shared` region, MiB; `None` = `mib / 2`.
    pub shared_mib: Option<u64>,
    /// Period of `stat` lines; 0 = none.
    pub report_ms: u64,
    /// Period of automatic verification; 0 = on demand only.
    pub verify_ms: u64,
    /// Loop gap that prints a `stall` line.
    pub stall_us: u64,
    /// Port writes per measured `exits` batch.
    pub exits: u64,
    /// Power off this long after `ready`; 0 = never.
    pub duration_ms: u64,
    /// TSC frequency override.
    pub tsc_khz: Option<u64>,
    /// Non-zero: fill a 16 KiB secret area and register it with the VMM (snapshot tests).
    pub secret: u64,
    /// `disk`: MiB of the disk the workload writes (from its start).
    pub disk_mib: u64,
    /// `disk`: blocks written per second; 0 = flat out.
    pub disk_rate: u64,
    /// `disk`: blocks written between flushes; 0 = never flush.
    pub disk_flush: u64,
    /// `disk`: the next block written is this many blocks on (wrapping): above 1, the
    /// writes scatter over the host's 64 KiB tracking blocks.
    pub disk_stride: u64,
    /// Virtio-mmio devices from `virtio_mmio.device=` (the first `devices_n`).
    pub devices: [crate::virtio::MmioDev; MAX_DEVICES],
    /// How many of `devices` are set.
    pub devices_n: usize,
    /// Non-zero: unique-region pages repeat their content every `repeat` pages (the same
    /// bytes at the same generation: redundancy a migration cache finds).
    pub repeat: u64,
    /// `dirty`: the next page written is this many pages on in the working set (wrapping):
    /// above 1, the writes land all over it, as a heap's or a key-value store's do.
    pub stride: u64,
    /// Non-zero: `dirty`'s rate varies over time, a phase of `vary_ms` each at 1, 1/4, 2
    /// and 1/2 times `rate`, in turn (a kernel compile's bursts).
    pub vary_ms: u64,
    /// `ip=A.B.C.D/N` and `gw=A.B.C.D`: the network configuration of `kv`.
    pub ip: Option<crate::kv::IpConfig>,
    /// `peer=A.B.C.D:PORT`: the server `kvload` loads.
    pub peer: Option<crate::kvload::Peer>,
    /// `kvload`'s requests per second.
    pub load_rate: u64,
    /// `console=serial`: every line through the 16550 byte by byte, even on spanvmm (as on
    /// QEMU: a benchmark compares the two with the same console cost); `console=line`, the
    /// default: one exit a line once the PV ID port matched.
    pub serial_console: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workloads: DIRTY | VERIFY,
            mib: 64,
            wss: None,
            rate: 10_000,
            write: 4096,
            seed: 1,
            shared_mib: None,
            report_ms: 1000,
            verify_ms: 0,
            secret: 0,
            repeat: 0,
            stride: 1,
            vary_ms: 0,
            stall_us: 5000,
            exits: 100_000,
            duration_ms: 0,
            tsc_khz: None,
            disk_mib: 16,
            disk_rate: 1000,
            disk_flush: 64,
            disk_stride: 1,
            devices: [crate::virtio::MmioDev { addr: 0 }; MAX_DEVICES],
            devices_n: 0,
            ip: None,
            peer: None,
            load_rate: 200,
            serial_console: false,
        }
    }
}

impl Config {
    /// Whether workload `bit` was asked for.
    pub fn has(&self, bit: u32) -> bool {
        self.workloads & bit != 0
    }
}

/// What is wrong with the command line, and the token at fault.
pub struct CmdlineError<'a> {
    /// Short description.
    pub what: &'static str,
    /// Offending token.
    pub token: &'a [u8],
}

fn number(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

fn ipv4(v: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for o in &mut out {
        *o = u8::try_from(number(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn workloads(value: &[u8]) -> Result<u32, CmdlineError<'_>> {
    let mut bits = 0;
    for name in value.split(|&b| b == b',').filter(|n| !n.is_empty()) {
        let (_, bit) = WORKLOADS
            .iter()
            .find(|(known, _)| known.as_bytes() == name)
            .ok_or(CmdlineError {
                what: "unknown workload",
                token: name,
            })?;
        bits |= bit;
    }
    Ok(bits)
}

/// Parses the command line. Unknown keys and words without `=` are ignored (a VMM may add its
/// own); a known key with a bad value is an error.
pub fn parse(cmdline: &[u8]) -> Result<Config, CmdlineError<'_>> {
    let mut cfg = Config::default();
    let tokens = cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty());
    for token in tokens {
        let Some(eq) = token.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&token[..eq], &token[eq + 1..]);
        if key == b"workload" {
            cfg.workloads = workloads(value)?;
            continue;
        }
        if key == b"ip" || key == b"gw" {
            let bad = CmdlineError {
                what: "bad address (ip=A.B.C.D/N gw=A.B.C.D)",
                token,
            };
            let (addr, prefix) = match (key, value.iter().position(|&b| b == b'/')) {
                (b"ip", Some(p)) => (&value[..p], number(&value[p + 1..]).filter(|&n| n <= 32)),
                (b"ip", None) => (value, Some(24)),
                _ => (value, Some(32)),
            };
            let (Some(addr), Some(prefix)) = (ipv4(addr), prefix) else {
                return Err(bad);
            };
            let ip = cfg.ip.get_or_insert(crate::kv::IpConfig {
                ip: [0; 4],
                prefix: 0,
                gw: None,
            });
            if key == b"ip" {
                ip.ip = addr;
                ip.prefix = prefix as u8;
            } else {
                ip.gw = Some(addr);
            }
            continue;
        }
        if key == b"peer" {
            let bad = CmdlineError {
                what: "bad peer (peer=A.B.C.D:PORT)",
                token,
            };
            let Some(colon) = value.iter().position(|&b| b == b':') else {
                return Err(bad);
            };
            let ip = ipv4(&value[..colon]);
            let port = number(&value[colon + 1..]).and_then(|p| u16::try_from(p).ok());
            match (ip, port) {
                (Some(ip), Some(port)) if port != 0 => {
                    cfg.peer = Some(crate::kvload::Peer { ip, port });
                }
                _ => return Err(bad),
            }
            continue;
        }
        if key == b"console" {
            cfg.serial_console = match value {
                b"serial" => true,
                b"line" => false,
                _ => {
                    return Err(CmdlineError {
                        what: "console= is serial or line",
                        token,
                    });
                }
            };
            continue;
        }
        if key == b"virtio_mmio.device" {
            let dev = crate::virtio::parse_device(value).ok_or(CmdlineError {
                what: "bad virtio_mmio.device=",
                token,
            })?;
            if cfg.devices_n < MAX_DEVICES {
                cfg.devices[cfg.devices_n] = dev;
                cfg.devices_n += 1;
            }
            continue;
        }
        let slot: &mut u64 = match key {
            b"mib" => &mut cfg.mib,
            b"wss" => cfg.wss.insert(0),
            b"rate" => &mut cfg.rate,
            b"write" => &mut cfg.write,
            b"seed" => &mut cfg.seed,
            b"shared_mib" => cfg.shared_mib.insert(0),
            b"report_ms" => &mut cfg.report_ms,
            b"verify_ms" => &mut cfg.verify_ms,
            b"stall_us" => &mut cfg.stall_us,
            b"exits" => &mut cfg.exits,
            b"duration_ms" => &mut cfg.duration_ms,
            b"tsc_khz" => cfg.tsc_khz.insert(0),
            b"secret" => &mut cfg.secret,
            b"disk_mib" => &mut cfg.disk_mib,
            b"disk_rate" => &mut cfg.disk_rate,
            b"disk_flush" => &mut cfg.disk_flush,
            b"disk_stride" => &mut cfg.disk_stride,
            b"repeat" => &mut cfg.repeat,
            b"stride" => &mut cfg.stride,
            b"vary_ms" => &mut cfg.vary_ms,
            b"load_rate" => &mut cfg.load_rate,
            _ => continue,
        };
        *slot = number(value).ok_or(CmdlineError {
            what: "not a number:",
            token,
        })?;
    }
    let bad = |what| Err(CmdlineError { what, token: b"" });
    if cfg.write < 8 || cfg.write > 4096 || !cfg.write.is_multiple_of(8) {
        return bad("write= must be a multiple of 8 in 8..4096");
    }
    if cfg.mib > MAX_MIB {
        return bad("mib= is above 65536");
    }
    if cfg.wss.is_some_and(|w| w > cfg.mib) || cfg.shared_mib.is_some_and(|s| s > cfg.mib) {
        return bad("wss= and shared_mib= must not exceed mib=");
    }
    if cfg.disk_mib == 0 || cfg.disk_mib > MAX_DISK_MIB {
        return bad("disk_mib= must be in 1..256");
    }
    if cfg.disk_stride == 0 || cfg.stride == 0 {
        return bad("disk_stride= and stride= must be at least 1");
    }
    if cfg.has(KV | KVLOAD) && cfg.ip.is_none_or(|ip| ip.ip == [0; 4]) {
        return bad("workload=kv and kvload need ip=A.B.C.D/N");
    }
    if cfg.has(KV) && cfg.has(KVLOAD) {
        return bad("workload=kv and kvload share the network device: one of them");
    }
    if cfg.has(KVLOAD) && (cfg.peer.is_none() || cfg.load_rate == 0 || cfg.load_rate > 100_000) {
        return bad("workload=kvload needs peer=A.B.C.D:PORT and load_rate= in 1..100000");
    }
    if cfg.tsc_khz == Some(0) || cfg.exits == 0 {
        return bad("tsc_khz= and exits= must not be 0");
    }
    Ok(cfg)
}
