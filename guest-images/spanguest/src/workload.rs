//! What every vCPU does after boot: populate its slice of memory, then loop — stall accounting,
//! mailbox and requests, `stat` lines, and bounded chunks of dirty / verify / exit-storm work,
//! sleeping 1 ms at a time when nothing is due.
//!
//! Each data page belongs to exactly one vCPU (a slice of each region), which alone writes,
//! verifies and keeps the generation of it: no two vCPUs ever touch the same page.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::arch::{outl, rdtsc};
use crate::config::{Config, DIRTY, DISK, EXITS, KV, KVLOAD, MMIO, VERIFY, ZERO};
use crate::console::Line;
use crate::disk::Disk;
use crate::kv::Server;
use crate::kvload::Client;
use crate::memory::{self, Layout, SHARED_SEED, WORDS};
use crate::pv;
use crate::tsc::Clock;

/// Everything vCPU 0 worked out at boot; read-only afterwards, shared by all vCPUs.
pub struct Plan {
    /// The command line.
    pub cfg: Config,
    /// Where the memory is.
    pub layout: Layout,
    /// vCPUs running.
    pub cpus: u64,
    /// Whether spanvmm's paravirtual device is there.
    pub pv: bool,
    /// TSC frequency.
    pub clock: Clock,
    /// TSC when vCPU 0 entered `spanguest_main`.
    pub t0: u64,
}

/// One idle step: short enough for ~1 ms stall resolution, long enough that the sleep exits
/// (one per step) cost little.
const SLEEP_US: u32 = 1000;
/// `kv`: the idle step while a client was served in the last `KV_HOT_MS`.
const KV_SLEEP_US: u32 = 20;
const KV_HOT_MS: u64 = 50;
/// A stall at least this long is stamped with the TSC at which it ended.
const LONG_STALL_US: u64 = 50_000;
/// Most time one work chunk (dirty, verify or exits) takes per loop iteration.
const CHUNK_US: u64 = 200;
/// `vary_ms`: the dirty rate's phases, in quarters of `rate`.
const VARY_QUARTERS: [u64; 4] = [4, 1, 8, 2];

static POPULATED_CPUS: AtomicU64 = AtomicU64::new(0);
static POPULATED_PAGES: AtomicU64 = AtomicU64::new(0);
static READY: AtomicBool = AtomicBool::new(false);
/// Set once any verification found a bad page: the power-off status becomes 2.
static BAD_SEEN: AtomicBool = AtomicBool::new(false);
/// A mailbox command vCPU 0 hands to every vCPU: bumping the epoch publishes `REQ_CMD`; each
/// vCPU adds one to `REQ_DONE` when it has carried it out.
static REQ_EPOCH: AtomicU64 = AtomicU64::new(0);
static REQ_CMD: AtomicU64 = AtomicU64::new(0);
static REQ_DONE: AtomicU64 = AtomicU64::new(0);

/// Populates this vCPU's pages, waits for the others, then runs the loop.
pub fn run(plan: &'static Plan, cpu: u64) -> ! {
    let mut w = Worker::new(plan, cpu);
    w.populate();
    POPULATED_PAGES.fetch_add(w.pages, Ordering::Relaxed);
    POPULATED_CPUS.fetch_add(1, Ordering::Release);
    if cpu == 0 {
        wait_for(plan.pv, || {
            POPULATED_CPUS.load(Ordering::Acquire) == plan.cpus
        });
        Line::new("ready")
            .num("cpus", plan.cpus)
            .num("pages", POPULATED_PAGES.load(Ordering::Relaxed))
            .num("ms", plan.clock.to_ms(rdtsc().wrapping_sub(plan.t0)))
            .emit();
        READY.store(true, Ordering::Release);
    } else {
        wait_for(plan.pv, || READY.load(Ordering::Acquire));
    }
    w.run()
}

/// Waits for another vCPU; on spanvmm each round is a short sleep, so a waiting vCPU does not
/// steal a host core from the one it waits for.
fn wait_for(pv: bool, done: impl Fn() -> bool) {
    while !done() {
        if pv {
            pv::sleep(true, 50, 0);
        } else {
            core::hint::spin_loop();
        }
    }
}

/// The next deadline of a periodic event; after a stall, one period from now (no bursts).
fn next_period(deadline: u64, period: u64, now: u64) -> u64 {
    let next = deadline + period;
    if next <= now { now + period } else { next }
}

/// Prints `done` and powers off: status 0, or 2 if a verification ever found a bad page.
pub fn finish() -> ! {
    Line::new("done").emit();
    pv::power_off(if BAD_SEEN.load(Ordering::Relaxed) {
        2
    } else {
        0
    })
}

/// Finds and opens the disk for the `disk` workload (vCPU 0), or stops the guest saying why.
fn open_disk(cfg: &Config, clock: Clock) -> Disk {
    let disk = Disk::open(cfg, clock.hz()).unwrap_or_else(|e| {
        let mut line = Line::new("error")
            .text("disk:")
            .text(e.what())
            .num("devices", cfg.devices_n as u64);
        for d in &cfg.devices[..cfg.devices_n] {
            line = line.hex("at", d.addr);
        }
        crate::fail(line)
    });
    let blk = disk.blk();
    Line::new("blk")
        .hex("addr", blk.base())
        .num("sectors", blk.sectors)
        .num("blocks", disk.blocks)
        .num("readonly", u64::from(blk.readonly))
        .num("flush", u64::from(blk.flush))
        .emit();
    disk
}

/// Finds the network device, or stops the guest saying why.
fn probe_net(cfg: &Config) -> crate::net::NetDev {
    crate::net::NetDev::probe(&cfg.devices[..cfg.devices_n]).unwrap_or_else(|e| {
        crate::fail(
            Line::new("error")
                .text("net:")
                .text(e.what())
                .num("devices", cfg.devices_n as u64),
        )
    })
}

/// The `kv` server (vCPU 0): too large for a vCPU's stack.
static mut SERVER: core::mem::MaybeUninit<Server> = core::mem::MaybeUninit::uninit();

/// Finds the network device, brings up the `kv` server (vCPU 0), or stops the guest saying why.
fn open_kv(cfg: &Config, clock: Clock) -> &'static mut Server {
    let dev = probe_net(cfg);
    let Some(ip) = cfg.ip else {
        crate::fail(Line::new("error").text("kv needs ip="));
    };
    let (m, base) = (dev.mac, dev.base());
    let now = rdtsc();
    let server = Server::new(dev, ip, now ^ cfg.seed, clock.to_us(now));
    // SAFETY: called once, by vCPU 0, which alone uses the server afterwards.
    let server = unsafe { (&raw mut SERVER).as_mut().expect("a static").write(server) };
    let [a, b, c, d] = ip.ip;
    let mac = u64::from_be_bytes([0, 0, m[0], m[1], m[2], m[3], m[4], m[5]]);
    Line::new("net")
        .hex("addr", base)
        .hex("mac", mac)
        .num("ip_a", u64::from(a))
        .num("ip_b", u64::from(b))
        .num("ip_c", u64::from(c))
        .num("ip_d", u64::from(d))
        .num("port", u64::from(crate::kv::PORT))
        .emit();
    server
}

/// The `kvload` client (vCPU 0).
static mut CLIENT: core::mem::MaybeUninit<Client> = core::mem::MaybeUninit::uninit();

/// Finds the network device, brings up the `kvload` client (vCPU 0), or stops the guest
/// saying why.
fn open_kvload(cfg: &Config, clock: Clock) -> &'static mut Client {
    let dev = probe_net(cfg);
    let (Some(ip), Some(peer)) = (cfg.ip, cfg.peer) else {
        crate::fail(Line::new("error").text("kvload needs ip= and peer="));
    };
    let now = rdtsc();
    let client = Client::new(
        dev,
        ip,
        peer,
        cfg.load_rate,
        now ^ cfg.seed,
        clock.to_us(now),
    );
    // SAFETY: called once, by vCPU 0, which alone uses the client afterwards.
    let client = unsafe { (&raw mut CLIENT).as_mut().expect("a static").write(client) };
    let [a, b, c, d] = peer.ip;
    Line::new("kvload")
        .text("start")
        .num("peer_a", u64::from(a))
        .num("peer_b", u64::from(b))
        .num("peer_c", u64::from(c))
        .num("peer_d", u64::from(d))
        .num("port", u64::from(peer.port))
        .num("rate", cfg.load_rate)
        .emit();
    client
}

/// Stops the guest after a disk request that never completed.
fn disk_failed(e: crate::virtio::Error) -> ! {
    crate::fail(Line::new("error").text("disk:").text(e.what()))
}

/// A verification pass in progress over this vCPU's pages.
struct Pass {
    /// Index into `Worker::owned`.
    region: usize,
    /// Next page index.
    next: u64,
    ok: u64,
    bad: u64,
    first_bad: Option<u64>,
    /// Asked through the mailbox (so it counts towards `REQ_DONE`).
    on_demand: bool,
    /// Next disk block to check (vCPU 0, after its pages).
    disk_next: u64,
    disk_ok: u64,
    disk_bad: u64,
    /// TSC when the pass started.
    started: u64,
}

impl Pass {
    fn new(on_demand: bool) -> Self {
        Pass {
            region: 0,
            next: 0,
            ok: 0,
            bad: 0,
            first_bad: None,
            on_demand,
            disk_next: 0,
            disk_ok: 0,
            disk_bad: 0,
            started: rdtsc(),
        }
    }
}

struct Worker {
    plan: &'static Plan,
    cpu: u64,
    clock: Clock,
    /// This vCPU's page index ranges: its slice of shared, work set, rest of the unique region.
    owned: [(u64, u64); 3],
    /// Owned pages written at least once.
    pages: u64,
    /// Words per dirty touch (`write` / 8).
    write_words: usize,
    chunk_ticks: u64,
    stall_ticks: u64,
    max_stall: u64,
    /// Ticks of the current gap spent waiting for the disk in requests too long to excuse: a
    /// stall line says how much of it was the guest's own synchronous I/O (a host flush).
    disk_stall: u64,
    /// This vCPU's share of `rate`; `None` = flat out.
    rate: Option<u64>,
    dirty_t0: u64,
    /// Touches counted against the rate since `dirty_t0`.
    dirty_used: u64,
    cursor: u64,
    dirtied: u64,
    /// `vary_ms`: TSC of the last dirty chunk, and touches due since then × TSC Hz.
    vary_last: u64,
    vary_credit: u128,
    last_gen: u32,
    pass: Option<Pass>,
    verify_every: u64,
    next_verify: u64,
    exits_n: u64,
    exits_ticks: u64,
    report_every: u64,
    next_report: u64,
    seen_epoch: u64,
    /// vCPU 0: the mailbox command being carried out (seq, cmd).
    pending: Option<(u64, u64)>,
    /// vCPU 0: last mailbox sequence number handled.
    handled: u64,
    /// vCPU 0: TSC at which to power off.
    deadline: Option<u64>,
    /// vCPU 0 with `disk`: the disk.
    disk: Option<Disk>,
    /// `disk` writes per second; `None` = flat out.
    disk_rate: Option<u64>,
    disk_t0: u64,
    disk_used: u64,
    /// Blocks moved at the last `disk` report, and when.
    disk_last: (u64, u64),
    /// vCPU 0 with `kv`: the server.
    kv: Option<&'static mut Server>,
    /// TSC of the last poll that moved anything: the loop sleeps briefly while traffic flows.
    kv_active: u64,
    /// vCPU 0 with `kvload`: the client.
    kvload: Option<&'static mut Client>,
}

impl Worker {
    fn new(plan: &'static Plan, cpu: u64) -> Self {
        let (cfg, lay, n, clock) = (&plan.cfg, &plan.layout, plan.cpus, plan.clock);
        let slice = |start: u64, len: u64| (start + len * cpu / n, start + len * (cpu + 1) / n);
        let rest = lay.pages - lay.shared - lay.work;
        let rate = match cfg.rate {
            0 => None,
            r => Some(r / n + u64::from(cpu < r % n)),
        };
        Worker {
            plan,
            cpu,
            clock,
            owned: [
                slice(0, lay.shared),
                slice(lay.shared, lay.work),
                slice(lay.shared + lay.work, rest),
            ],
            pages: 0,
            write_words: (cfg.write / 8) as usize,
            chunk_ticks: clock.us(CHUNK_US),
            stall_ticks: clock.us(cfg.stall_us),
            max_stall: 0,
            disk_stall: 0,
            rate,
            dirty_t0: 0,
            dirty_used: 0,
            cursor: 0,
            dirtied: 0,
            vary_last: 0,
            vary_credit: 0,
            last_gen: 1,
            pass: None,
            verify_every: if cfg.has(VERIFY) {
                clock.ms(cfg.verify_ms)
            } else {
                0
            },
            next_verify: 0,
            exits_n: 0,
            exits_ticks: 0,
            report_every: clock.ms(cfg.report_ms),
            next_report: 0,
            seen_epoch: 0,
            pending: None,
            handled: 0,
            deadline: None,
            disk: (cpu == 0 && cfg.has(DISK)).then(|| open_disk(cfg, clock)),
            disk_rate: match cfg.disk_rate {
                0 => None,
                r => Some(r),
            },
            disk_t0: 0,
            disk_used: 0,
            disk_last: (0, 0),
            kv: (cpu == 0 && cfg.has(KV)).then(|| open_kv(cfg, clock)),
            kv_active: 0,
            kvload: (cpu == 0 && cfg.has(KVLOAD)).then(|| open_kvload(cfg, clock)),
        }
    }

    fn layout(&self) -> &Layout {
        &self.plan.layout
    }

    fn generation(&self, k: u64) -> *mut u32 {
        (self.layout().gen_base + k * 4) as *mut u32
    }

    fn page(&self, k: u64) -> *mut u64 {
        (self.layout().data_base + k * 4096) as *mut u64
    }

    /// The (page id, seed) page `k`'s pattern derives from: shared pages use their index and
    /// the fixed seed (same bytes in every VM), the others their guest-physical page number.
    fn ident(&self, k: u64) -> (u64, u64) {
        let lay = self.layout();
        let repeat = self.plan.cfg.repeat;
        if k < lay.shared {
            (k, SHARED_SEED)
        } else if repeat > 0 {
            (
                lay.data_base / 4096 + lay.shared + (k - lay.shared) % repeat,
                self.plan.cfg.seed,
            )
        } else {
            (lay.data_base / 4096 + k, self.plan.cfg.seed)
        }
    }

    /// Writes all of page `k` at generation 1.
    fn write_whole(&mut self, k: u64) {
        let (p, seed) = self.ident(k);
        // SAFETY: page k and its generation slot lie in the RAM `memory::plan` reserved for
        // the workload, identity-mapped, and only this vCPU owns them.
        unsafe {
            memory::fill(self.page(k), 0, WORDS, memory::mix(p, 1, seed));
            self.generation(k).write_volatile(1);
        }
        self.pages += 1;
    }

    fn populate(&mut self) {
        let sparse = self.plan.cfg.has(ZERO);
        for (start, end) in self.owned {
            for k in start..end {
                // `zero`: the first page of each MiB only; the rest stays untouched.
                if !sparse || k.is_multiple_of(256) {
                    self.write_whole(k);
                }
            }
        }
    }

    /// One dirty touch of page `k`: the first `write` bytes at the next generation. A page never
    /// written before is written whole at generation 1 instead.
    fn touch(&mut self, k: u64) {
        // SAFETY: as in `write_whole`.
        let old = unsafe { self.generation(k).read_volatile() };
        if old == 0 {
            self.write_whole(k);
            self.last_gen = 1;
            return;
        }
        // Generation 0 means "never written", so wrap to 1 (consistent with the untouched tail).
        let g = old.checked_add(1).unwrap_or(1);
        let (p, seed) = self.ident(k);
        // SAFETY: as in `write_whole`.
        unsafe {
            memory::fill(
                self.page(k),
                0,
                self.write_words,
                memory::mix(p, u64::from(g), seed),
            );
            self.generation(k).write_volatile(g);
        }
        self.last_gen = g;
    }

    /// Whether page `k` holds what its generation says; `None` if it was never written.
    fn check(&self, k: u64) -> Option<bool> {
        // SAFETY: as in `write_whole`.
        let g = unsafe { self.generation(k).read_volatile() };
        if g == 0 {
            return None;
        }
        let (p, seed) = self.ident(k);
        let head = memory::mix(p, u64::from(g), seed);
        let page = self.page(k);
        // SAFETY: as in `write_whole`.
        Some(unsafe {
            if g == 1 || self.write_words == WORDS {
                memory::holds(page, 0, WORDS, head)
            } else {
                memory::holds(page, 0, self.write_words, head)
                    && memory::holds(page, self.write_words, WORDS, memory::mix(p, 1, seed))
            }
        })
    }

    /// The loop. Each iteration's gap from the previous one, less requested sleeps and waits for
    /// the serial lock, is the stall the guest saw.
    fn run(&mut self) -> ! {
        let cfg = self.plan.cfg;
        let start = rdtsc();
        self.dirty_t0 = start;
        self.next_report = start + self.report_every;
        self.next_verify = start + self.verify_every;
        self.disk_t0 = start;
        self.disk_last = (0, start);
        if self.cpu == 0 && cfg.duration_ms > 0 {
            self.deadline = Some(start + self.clock.ms(cfg.duration_ms));
        }
        let sleep_ticks = self.clock.us(u64::from(SLEEP_US));
        let mut prev = start;
        let mut excused = 0u64;
        loop {
            let now = rdtsc();
            let gap = now.wrapping_sub(prev).saturating_sub(excused);
            prev = now;
            excused = 0;
            self.max_stall = self.max_stall.max(gap);
            let disk_stall = core::mem::take(&mut self.disk_stall);
            if gap > self.stall_ticks {
                let us = self.clock.to_us(gap);
                let mut line = Line::new("stall").num("cpu", self.cpu).num("us", us);
                if disk_stall > 0 {
                    line = line.num("disk_us", self.clock.to_us(disk_stall.min(gap)));
                }
                // A long gap (a pause, restore or migration) also says when it ended: the
                // host can time the guest's first progress apart from this line's output.
                if us >= LONG_STALL_US {
                    line = line.hex("tsc", now);
                }
                excused += self.out(line);
            }
            if self.cpu == 0 {
                if self.deadline.is_some_and(|d| now >= d) {
                    finish();
                }
                excused += self.poll_mailbox();
            }
            self.poll_requests();
            if self.report_every > 0 && now >= self.next_report {
                excused += self.report();
                self.next_report = next_period(self.next_report, self.report_every, now);
            }
            if self.verify_every > 0 && now >= self.next_verify {
                self.next_verify = next_period(self.next_verify, self.verify_every, now);
                if self.pass.is_none() {
                    self.pass = Some(Pass::new(false));
                }
            }
            let mut busy = false;
            if self.pass.is_some() {
                busy = true;
                excused += self.verify_chunk();
            }
            if cfg.has(EXITS | MMIO) {
                busy = true;
                excused += self.exits_chunk();
            }
            if cfg.has(DIRTY) {
                busy |= self.dirty_chunk(now);
            }
            if self.disk.is_some() {
                let (more, waited) = self.disk_chunk(now);
                busy |= more;
                excused += waited;
            }
            let mut sleep = (SLEEP_US, sleep_ticks);
            if let Some(kv) = self.kv.as_mut() {
                if kv.poll(self.clock.to_us(now)) {
                    self.kv_active = now;
                    busy = true;
                } else if now.wrapping_sub(self.kv_active) < self.clock.ms(KV_HOT_MS) {
                    // A client is talking: answer within tens of µs, not a whole sleep step.
                    sleep = (KV_SLEEP_US, self.clock.us(u64::from(KV_SLEEP_US)));
                }
            }
            if let Some(c) = self.kvload.as_mut() {
                let us = self.clock.to_us(now);
                if c.poll(us) {
                    busy = true;
                }
                // A request in flight: see its answer within tens of µs (it is timed).
                if c.waiting_us(us) > 0 {
                    sleep = (KV_SLEEP_US, self.clock.us(u64::from(KV_SLEEP_US)));
                }
            }
            if self.cpu == 0 {
                excused += self.maybe_ack();
            }
            if !busy {
                pv::sleep(self.plan.pv, sleep.0, sleep.1);
                excused += sleep.1;
            }
        }
    }

    /// Sends `line`; returns the ticks to leave out of the stall measurement: the wait for other
    /// vCPUs' lines, and the guest's own output time unless that alone exceeds the stall
    /// threshold (then something else, a pause, happened during it).
    fn out(&self, line: Line) -> u64 {
        let (waited, sending) = line.send();
        waited
            + if sending <= self.stall_ticks {
                sending
            } else {
                0
            }
    }

    fn report(&mut self) -> u64 {
        let mut waited = self.out(
            Line::new("stat")
                .num("cpu", self.cpu)
                .num("gen", u64::from(self.last_gen))
                .num("pages", self.pages)
                .num("dirtied", self.dirtied)
                .num("max_stall_us", self.clock.to_us(self.max_stall)),
        );
        if let Some(d) = &self.disk {
            let c = d.counts;
            let now = rdtsc();
            let moved = c.writes + c.reads;
            let (last, then) = self.disk_last;
            let us = self.clock.to_us(now.wrapping_sub(then)).max(1);
            let kib_s = (moved - last) * (crate::virtio::BLOCK as u64 / 1024) * 1_000_000 / us;
            self.disk_last = (moved, now);
            waited += self.out(
                Line::new("disk")
                    .num("writes", c.writes)
                    .num("reads", c.reads)
                    .num("errors", c.errors)
                    .num("flushes", c.flushes)
                    .num("kib_s", kib_s),
            );
        }
        if let Some(kv) = &self.kv {
            let (c, d) = (kv.counts, kv.dev().counts);
            waited += self.out(
                Line::new("kv")
                    .num("accepted", c.accepted)
                    .num("open", c.open)
                    .num("commands", c.commands)
                    .num("errors", c.errors)
                    .num("rx", d.rx)
                    .num("tx", d.tx)
                    .num("tx_full", d.tx_full),
            );
        }
        let now_us = self.clock.to_us(rdtsc());
        let load = self
            .kvload
            .as_mut()
            .map(|c| (c.period(), c.totals, c.waiting_us(now_us)));
        if let Some((p, t, waiting)) = load {
            waited += self.out(
                Line::new("kvload")
                    .num("reqs", p.reqs)
                    .num("mean_us", p.mean_us)
                    .num("p99_us", p.p99_us)
                    .num("max_us", p.max_us)
                    .num("waiting_us", waiting)
                    .num("total", t.reqs)
                    .num("errors", t.errors)
                    .num("connects", t.connects),
            );
        }
        waited
    }

    /// Writes the disk blocks due at `disk_rate` (all it can in one chunk if flat out).
    /// Returns whether more work is due right away, and the time spent waiting for the device
    /// in requests shorter than the stall threshold (the guest's own work, not a stall; a
    /// longer one, as across a pause, still shows as a stall).
    fn disk_chunk(&mut self, now: u64) -> (bool, u64) {
        let allowed = match self.disk_rate {
            None => u64::MAX,
            Some(rate) => {
                let elapsed = u128::from(now.wrapping_sub(self.disk_t0));
                let due = (elapsed * u128::from(rate) / u128::from(self.clock.hz())) as u64;
                // After a stall, no burst: at most ~10 ms worth of catching up.
                let backlog = (rate / 100).max(4);
                self.disk_used = self.disk_used.max(due.saturating_sub(backlog));
                due.saturating_sub(self.disk_used)
            }
        };
        let Some(disk) = self.disk.as_mut() else {
            return (false, 0);
        };
        let end_tsc = now + self.chunk_ticks;
        let (mut n, mut waited) = (0, 0);
        let mut t = rdtsc();
        while n < allowed {
            disk.write_next().unwrap_or_else(|e| disk_failed(e));
            n += 1;
            let done = rdtsc();
            if done - t < self.stall_ticks {
                waited += done - t;
            } else {
                self.disk_stall += done - t;
            }
            t = done;
            if done >= end_tsc {
                break;
            }
        }
        self.disk_used += n;
        (self.disk_rate.is_none() || n < allowed, waited)
    }

    /// Rewrites the pages due at this vCPU's rate (all it can in one chunk if flat out).
    /// Returns whether more work is due right away.
    fn dirty_chunk(&mut self, now: u64) -> bool {
        let (start, end) = self.owned[1];
        let len = end - start;
        if len == 0 {
            return false;
        }
        let vary_ms = self.plan.cfg.vary_ms;
        let allowed = match self.rate {
            None => u64::MAX,
            Some(0) => return false,
            Some(rate) if vary_ms > 0 => {
                // The rate of the current phase, accrued since the last chunk: a constant
                // rate's catch-up arithmetic would smear the phases together.
                let hz = u128::from(self.clock.hz());
                let t = now.wrapping_sub(self.dirty_t0);
                let phase = (t / self.clock.ms(vary_ms).max(1)) as usize % VARY_QUARTERS.len();
                let rate_now = u128::from(rate * VARY_QUARTERS[phase] / 4);
                if self.vary_last == 0 {
                    self.vary_last = now;
                }
                let dt = u128::from(now.wrapping_sub(self.vary_last));
                self.vary_last = now;
                let backlog = (rate_now / 100).max(16) * hz;
                self.vary_credit = (self.vary_credit + dt * rate_now).min(backlog);
                (self.vary_credit / hz) as u64
            }
            Some(rate) => {
                let elapsed = u128::from(now.wrapping_sub(self.dirty_t0));
                let due = (elapsed * u128::from(rate) / u128::from(self.clock.hz())) as u64;
                // After a stall, catch up by at most ~10 ms worth: a burst would distort the
                // dirty rate a migration sees.
                let backlog = (rate / 100).max(16);
                self.dirty_used = self.dirty_used.max(due.saturating_sub(backlog));
                due.saturating_sub(self.dirty_used)
            }
        };
        let end_tsc = now + self.chunk_ticks;
        let mut n = 0;
        while n < allowed {
            self.touch(start + self.cursor);
            self.cursor = (self.cursor + self.plan.cfg.stride % len) % len;
            n += 1;
            if n.is_multiple_of(8) && rdtsc() >= end_tsc {
                break;
            }
        }
        self.dirty_used += n;
        self.vary_credit = self
            .vary_credit
            .saturating_sub(u128::from(n) * u128::from(self.clock.hz()));
        self.dirtied += n;
        self.rate.is_none() || n < allowed
    }

    /// Verifies the next pages of the pass for at most one chunk; prints the result at the end.
    /// Returns the serial-lock wait.
    fn verify_chunk(&mut self) -> u64 {
        let Some(mut pass) = self.pass.take() else {
            return 0;
        };
        let end_tsc = rdtsc() + self.chunk_ticks;
        let mut n = 0u32;
        while let Some(&(start, end)) = self.owned.get(pass.region) {
            pass.next = pass.next.max(start);
            if pass.next >= end {
                pass.region += 1;
                continue;
            }
            match self.check(pass.next) {
                Some(true) => pass.ok += 1,
                Some(false) => {
                    pass.bad += 1;
                    pass.first_bad.get_or_insert(self.page(pass.next) as u64);
                }
                None => {}
            }
            pass.next += 1;
            n += 1;
            if n.is_multiple_of(16) && rdtsc() >= end_tsc {
                self.pass = Some(pass);
                return 0;
            }
        }
        // Then the disk (vCPU 0): every written block read back and checked.
        let mut waited = 0;
        if let Some(disk) = self.disk.as_mut() {
            while pass.disk_next < disk.blocks {
                let t = rdtsc();
                let checked = disk
                    .check(pass.disk_next)
                    .unwrap_or_else(|e| disk_failed(e));
                let took = rdtsc() - t;
                if took < self.stall_ticks {
                    waited += took;
                } else {
                    self.disk_stall += took;
                }
                match checked {
                    Some(true) => pass.disk_ok += 1,
                    Some(false) => {
                        pass.disk_bad += 1;
                        // Block numbers are told apart from page addresses by the top bit.
                        pass.first_bad.get_or_insert(1 << 63 | pass.disk_next);
                    }
                    None => {}
                }
                pass.disk_next += 1;
                if rdtsc() >= end_tsc {
                    self.pass = Some(pass);
                    return waited;
                }
            }
        }
        let mut line = Line::new("verify")
            .num("cpu", self.cpu)
            .num("ok", pass.ok)
            .num("bad", pass.bad + pass.disk_bad)
            .num("ms", self.clock.to_ms(rdtsc().wrapping_sub(pass.started)));
        if self.plan.cfg.has(DISK) {
            line = line
                .num("disk_ok", pass.disk_ok)
                .num("disk_bad", pass.disk_bad);
        }
        if let Some(addr) = pass.first_bad {
            BAD_SEEN.store(true, Ordering::Relaxed);
            line = line.hex("first_bad", addr);
        }
        waited += self.out(line);
        if pass.on_demand {
            REQ_DONE.fetch_add(1, Ordering::Release);
        }
        waited
    }

    /// Port (or, for `mmio`, MMIO) writes for at most one chunk; prints a line per completed
    /// batch of `exits`.
    fn exits_chunk(&mut self) -> u64 {
        let batch = self.plan.cfg.exits;
        let mmio = self.plan.cfg.has(MMIO);
        let start = rdtsc();
        let end_tsc = start + self.chunk_ticks;
        loop {
            if mmio {
                // SAFETY: the address is identity-mapped and backed by no RAM: the write only
                // exits to the VMM.
                unsafe { (pv::MMIO_EXIT_STORM as *mut u32).write_volatile(self.exits_n as u32) };
            } else {
                outl(pv::PORT_EXIT_STORM, self.exits_n as u32);
            }
            self.exits_n += 1;
            if self.exits_n >= batch || rdtsc() >= end_tsc {
                break;
            }
        }
        self.exits_ticks += rdtsc() - start;
        if self.exits_n < batch {
            return 0;
        }
        let ns = self.clock.to_ns(self.exits_ticks) / self.exits_n;
        let line = Line::new("exits")
            .num("cpu", self.cpu)
            .num("n", self.exits_n)
            .num("ns_per_exit", ns)
            .num("mmio", u64::from(mmio));
        self.exits_n = 0;
        self.exits_ticks = 0;
        self.out(line)
    }

    /// Takes up a request vCPU 0 published: reset the stall counter, or start an on-demand pass
    /// (replacing a periodic one: pages checked before the command do not count).
    fn poll_requests(&mut self) {
        let epoch = REQ_EPOCH.load(Ordering::Acquire);
        if epoch == self.seen_epoch {
            return;
        }
        self.seen_epoch = epoch;
        if REQ_CMD.load(Ordering::Relaxed) == pv::CMD_VERIFY {
            self.pass = Some(Pass::new(true));
        } else {
            self.max_stall = 0;
            REQ_DONE.fetch_add(1, Ordering::Release);
        }
    }

    /// vCPU 0: reads a new mailbox command (one at a time). Returns the serial-lock wait.
    fn poll_mailbox(&mut self) -> u64 {
        if self.pending.is_some() {
            return 0;
        }
        let seq = pv::MAILBOX.seq.load(Ordering::Acquire);
        if seq == self.handled {
            return 0;
        }
        let cmd = pv::MAILBOX.cmd.load(Ordering::Acquire);
        match cmd {
            pv::CMD_VERIFY | pv::CMD_RESET_STALL => {
                REQ_DONE.store(0, Ordering::Relaxed);
                REQ_CMD.store(cmd, Ordering::Relaxed);
                REQ_EPOCH.fetch_add(1, Ordering::Release);
                self.pending = Some((seq, cmd));
                0
            }
            pv::CMD_POWER_OFF => {
                self.ack(seq, cmd);
                finish()
            }
            _ => self.ack(seq, cmd), // unknown: acknowledged, otherwise ignored
        }
    }

    /// vCPU 0: acknowledges the pending command once every vCPU has carried it out.
    fn maybe_ack(&mut self) -> u64 {
        match self.pending {
            Some((seq, cmd)) if REQ_DONE.load(Ordering::Acquire) == self.plan.cpus => {
                self.pending = None;
                self.ack(seq, cmd)
            }
            _ => 0,
        }
    }

    fn ack(&mut self, seq: u64, cmd: u64) -> u64 {
        let waited = self.out(Line::new("ack").num("seq", seq).num("cmd", cmd));
        pv::ack(seq);
        self.handled = seq;
        waited
    }
}
