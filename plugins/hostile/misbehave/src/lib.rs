//! A hostile service for the runtime's tests. What it does wrong is chosen by the attach
//! config `{"mode": …}`:
//! - `loop-attach`: never returns from attach;
//! - `loop-event`: never returns from a write to its port;
//! - anything else (`calls`): behaves until told otherwise through `call`:
//!   `loop` (never returns), `alloc` (allocates until refused), `oob` (reads past guest RAM and
//!   reports what the host said), `big-read` (asks for more than 1 MiB), `write` (writes memory
//!   without the capability), `panic`, `pause` (pauses and resumes the VM), `writes` (how many
//!   port writes it saw), `ptrace` (native only: makes the ptrace syscall, which no spanvmm
//!   thread may make, and reports what it returned), `notify N` (N notifications); and, against WASI (deny-by-default, Wasm build only): `wasi-file`,
//!   `wasi-write-file`, `wasi-socket`, `wasi-env`, `wasi-clock` (report what the host refused or
//!   allowed), `print` (stdout and stderr lines), `print-flood N` (N bytes, no newline).
//!
//! It always claims port 0x6f0.

use spanvmm_sdk::{export_service, host, Event, EventKind, EventReply, Manifest, Service};

#[derive(Default)]
struct Misbehave {
    mode: String,
    writes: u64,
    hoard: Vec<Vec<u8>>,
}

/// ptrace(PTRACE_PEEKDATA, 1, 0, 0), raw: harmless where it is allowed (it fails, pid 1 is not
/// our tracee), and forbidden by every spanvmm seccomp filter. Returns the raw result.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn ptrace_syscall() -> i64 {
    let ret: i64;
    // SAFETY: a syscall with plain integer arguments; it reads no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 101i64 => ret,
            in("rdi") 2i64,
            in("rsi") 1i64,
            in("rdx") 0i64,
            in("r10") 0i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn ptrace_syscall() -> i64 {
    -38 // ENOSYS: a Wasm component cannot make syscalls at all
}

fn spin() -> ! {
    let mut x = 0u64;
    loop {
        // A volatile store keeps the loop from being optimized into `unreachable`.
        // SAFETY: `x` is a live local.
        unsafe { std::ptr::write_volatile(&mut x, x.wrapping_add(1)) };
    }
}

impl Service for Misbehave {
    fn manifest() -> Manifest {
        Manifest::new("misbehave", "0.1.0")
            .events(&[EventKind::PortWrite])
            .capabilities(&[
                spanvmm_sdk::Capability::MemoryRead,
                spanvmm_sdk::Capability::PauseResume,
            ])
    }

    fn attach(&mut self, config: &str) -> Result<(), String> {
        let cfg: serde_json::Value = serde_json::from_str(config).unwrap_or_default();
        self.mode = cfg
            .get("mode")
            .and_then(|m| m.as_str())
            .unwrap_or("calls")
            .to_string();
        if self.mode == "loop-attach" {
            spin();
        }
        host::claim_ports(0x6f0, 1)
    }

    fn on_event(&mut self, _event: Event) -> EventReply {
        if self.mode == "loop-event" {
            spin();
        }
        self.writes += 1;
        EventReply::None
    }

    fn call(&mut self, method: &str, args: &str) -> Result<String, String> {
        match method {
            "loop" => spin(),
            // Reserve without touching: the memory grows at once, the deadline is not the limit.
            "alloc" => loop {
                let mut chunk = Vec::with_capacity(8 << 20);
                chunk.push(1u8);
                self.hoard.push(chunk);
            },
            "oob" => {
                let mem = host::vm_info().mem_bytes;
                match host::read_memory(mem - 8, 64) {
                    Ok(_) => Err("read past the end of guest RAM succeeded".into()),
                    Err(e) => Ok(e),
                }
            }
            "big-read" => match host::read_memory(0, (1 << 20) + 1) {
                Ok(_) => Err("a read over 1 MiB succeeded".into()),
                Err(e) => Ok(e),
            },
            "write" => match host::write_memory(0, b"pwned") {
                Ok(()) => Err("write without memory-write succeeded".into()),
                Err(e) => Ok(e),
            },
            "panic" => panic!("misbehave was told to panic"),
            "pause" => {
                host::pause()?;
                host::resume()?;
                Ok("{}".into())
            }
            "writes" => Ok(self.writes.to_string()),
            // A noisy service: `args` notifications (kind `noise`, detail `{"i": n}`).
            "notify" => {
                let n: u32 = args.trim().parse().map_err(|e| format!("notify N: {e}"))?;
                for i in 0..n {
                    host::notify("noise", &format!("{{\"i\": {i}}}"));
                }
                Ok(n.to_string())
            }
            "ptrace" => Ok(format!("{{\"ptrace\": {}}}", ptrace_syscall())),
            // What a service logs reaches the VMM's log under its name.
            "log" => {
                host::log(spanvmm_sdk::LogLevel::Warn, args);
                Ok("{}".into())
            }
            // WASI is deny-by-default: each of these must fail inside the service (an error it
            // can report), never trap. Only meaningful in the Wasm build: native code is the
            // VMM and can do all of this.
            "wasi-file" => match std::fs::read(if args.is_empty() {
                "/etc/hostname"
            } else {
                args
            }) {
                Ok(b) => Err(format!("read {} bytes of a host file", b.len())),
                Err(e) => Ok(serde_json::json!({ "error": e.to_string() }).to_string()),
            },
            "wasi-write-file" => match std::fs::write("misbehave-was-here", b"x") {
                Ok(()) => Err("created a host file".into()),
                Err(e) => Ok(serde_json::json!({ "error": e.to_string() }).to_string()),
            },
            "wasi-socket" => {
                let to = if args.is_empty() {
                    "127.0.0.1:22"
                } else {
                    args
                };
                let connect = std::net::TcpStream::connect(to).map(|_| ());
                let listen = std::net::TcpListener::bind("127.0.0.1:0").map(|_| ());
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").map(|_| ());
                match (connect, listen, udp) {
                    (Err(c), Err(l), Err(u)) => Ok(serde_json::json!({
                        "connect": c.to_string(), "listen": l.to_string(), "udp": u.to_string()
                    })
                    .to_string()),
                    _ => Err(format!("a socket to {to} or on loopback worked")),
                }
            }
            "wasi-env" => Ok(serde_json::json!({
                "vars": std::env::vars_os().count(),
                "args": std::env::args_os().count(),
                "cwd": std::env::current_dir().is_ok(),
            })
            .to_string()),
            "wasi-clock" => {
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?
                    .as_secs();
                let t = std::time::Instant::now();
                Ok(
                    serde_json::json!({ "wall_s": wall, "mono_ok": t.elapsed().as_secs() < 5 })
                        .to_string(),
                )
            }
            "print" => {
                println!("{args}");
                eprintln!("on stderr: {args}");
                Ok("{}".into())
            }
            // Prints `args` bytes without a newline: the host logs bounded pieces.
            "print-flood" => {
                use std::io::Write;
                let n: usize = args.parse().map_err(|e| format!("{e}"))?;
                let chunk = [b'z'; 1024];
                let mut out = std::io::stdout();
                for _ in 0..n / 1024 {
                    out.write_all(&chunk).map_err(|e| e.to_string())?;
                }
                out.flush().map_err(|e| e.to_string())?;
                Ok("{}".into())
            }
            m => Err(format!("unknown method {m:?}")),
        }
    }
}

export_service!(Misbehave);
