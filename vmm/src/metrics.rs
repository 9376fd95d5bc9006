//! Prometheus metrics of one VM's process, in the OpenMetrics text format (`prometheus-client`):
//! `GET /metrics` on the API socket, and `--metrics-addr HOST:PORT` for a TCP listener. A
//! scrape reads the VMM's counters where they live (vCPU exits on the bus, pauses and dirty
//! pages in `VmControl`, services and snapshots in the service manager, the migration in
//! flight) from the connection's own thread: a busy main loop does not hold scrapes up.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use base_vmm::devices::IoBus;
use base_vmm::vmm::{RunState, VmControl};
use l1_services::{ServiceManager, ServiceState, EVENT_NS_BOUNDS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The VM's parts a scrape reads, once the VM exists.
struct VmParts {
    ctl: Arc<VmControl>,
    bus: Arc<IoBus>,
    manager: Arc<ServiceManager>,
}

/// Events the main loop counts for metrics.
#[derive(Default, Debug)]
pub struct Counters {
    /// Outgoing migrations by result: completed, failed, in-doubt.
    pub migrations: [AtomicU64; 3],
    /// Live updates rolled back.
    pub live_update_rollbacks: AtomicU64,
    /// Live updates left in doubt.
    pub live_updates_in_doubt: AtomicU64,
    /// This process took the VM over by a live update, restoring in this many µs (0: no).
    pub takeover_restore_us: AtomicU64,
}

/// The result labels of [`Counters::migrations`].
pub const MIGRATION_RESULTS: [&str; 3] = ["completed", "failed", "in-doubt"];

/// Everything a scrape needs; shared by the API threads and the main loop.
pub struct Metrics {
    started: Instant,
    vm: OnceLock<VmParts>,
    /// What the main loop counts.
    pub counters: Counters,
}

impl Metrics {
    /// Metrics of a process that has no VM yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics {
            started: Instant::now(),
            vm: OnceLock::new(),
            counters: Counters::default(),
        })
    }

    /// The VM exists: scrapes read it from now on.
    pub fn set_vm(&self, ctl: Arc<VmControl>, bus: Arc<IoBus>, manager: Arc<ServiceManager>) {
        let _ = self.vm.set(VmParts { ctl, bus, manager });
    }

    /// The VM's service manager, once the VM exists.
    pub fn manager(&self) -> Option<&Arc<ServiceManager>> {
        self.vm.get().map(|v| &v.manager)
    }

    /// The OpenMetrics text of a scrape.
    pub fn scrape(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("spanvmm");
        registry.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            // Encoding into a String cannot fail; say so rather than serve half a page.
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

#[derive(Debug)]
struct Scrape(Arc<Metrics>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(&[(&str, &str)], u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    if let [(&[], v)] = values {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(&labels.to_vec())?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(&[(&str, &str)], f64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    if let [(&[], v)] = values {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in values {
        ConstGauge::new(*v).encode(m.encode_family(&labels.to_vec())?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.0;
        let c = &m.counters;
        gauge(
            &mut enc,
            "process_uptime",
            "Time since this VMM process started",
            Some(&Unit::Seconds),
            &[(&[], m.started.elapsed().as_secs_f64())],
        )?;
        let results: Vec<([(&str, &str); 1], u64)> = MIGRATION_RESULTS
            .iter()
            .zip(&c.migrations)
            .map(|(r, n)| ([("result", *r)], n.load(Ordering::Relaxed)))
            .collect();
        let results: Vec<(&[(&str, &str)], u64)> =
            results.iter().map(|(l, n)| (&l[..], *n)).collect();
        counter(
            &mut enc,
            "migrations",
            "Outgoing migrations finished, by result",
            None,
            &results,
        )?;
        counter(
            &mut enc,
            "live_update_rollbacks",
            "Live updates rolled back (the guest ran on here)",
            None,
            &[(&[], c.live_update_rollbacks.load(Ordering::Relaxed))],
        )?;
        counter(
            &mut enc,
            "live_updates_in_doubt",
            "Live updates whose new process did not confirm (the VM is held in doubt)",
            None,
            &[(&[], c.live_updates_in_doubt.load(Ordering::Relaxed))],
        )?;
        gauge(
            &mut enc,
            "live_update_takeover_restore",
            "This process took the VM over by a live update: its restore time (0: it did not)",
            Some(&Unit::Seconds),
            &[(
                &[],
                c.takeover_restore_us.load(Ordering::Relaxed) as f64 / 1e6,
            )],
        )?;
        let Some(vm) = m.vm.get() else {
            return Ok(());
        };
        self.encode_vm(&mut enc, vm)
    }
}

impl Scrape {
    fn encode_vm(&self, enc: &mut DescriptorEncoder, vm: &VmParts) -> std::fmt::Result {
        let running = vm.ctl.run_state() == RunState::Running;
        gauge(
            enc,
            "vm_running",
            "1 while the vCPUs run, 0 while paused",
            None,
            &[(&[], if running { 1.0 } else { 0.0 })],
        )?;
        gauge(
            enc,
            "vm_memory",
            "Guest RAM",
            Some(&Unit::Bytes),
            &[(&[], vm.ctl.ram().size() as f64)],
        )?;
        let exits: Vec<([(&str, &str); 1], u64)> = vm
            .bus
            .exits
            .get()
            .into_iter()
            .map(|(k, n)| ([("kind", k.name())], n))
            .collect();
        let exits: Vec<(&[(&str, &str)], u64)> = exits.iter().map(|(l, n)| (&l[..], *n)).collect();
        counter(
            enc,
            "vm_exits",
            "VM exits of all vCPUs, by kind",
            None,
            &exits,
        )?;
        counter(
            enc,
            "vm_pauses",
            "Times this process paused the guest (API, snapshot, migration, live update)",
            None,
            &[(&[], vm.ctl.pauses())],
        )?;
        counter(
            enc,
            "vm_dirty_pages",
            "Dirty pages harvested (their rate is the guest's dirty rate while tracked)",
            None,
            &[(&[], vm.ctl.dirty_harvested())],
        )?;
        self.encode_services(enc, &vm.manager)?;
        let totals = vm.manager.snapshot_totals();
        counter(
            enc,
            "snapshot_layers",
            "Snapshot layers written, by result",
            None,
            &[
                (
                    &[("result", "committed")],
                    totals.committed.load(Ordering::Relaxed),
                ),
                (
                    &[("result", "failed")],
                    totals.failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        counter(
            enc,
            "snapshot_written",
            "Bytes written to snapshot layers' memory files",
            Some(&Unit::Bytes),
            &[(&[], totals.bytes_written.load(Ordering::Relaxed))],
        )?;
        gauge(
            enc,
            "snapshot_in_progress",
            "1 while a snapshot layer is being written",
            None,
            &[(
                &[],
                if vm.manager.snapshot_in_progress() {
                    1.0
                } else {
                    0.0
                },
            )],
        )?;
        if let Some(mig) = vm.manager.migration() {
            let p = mig.progress();
            let phase = format!("{:?}", p.phase).to_lowercase();
            let l: &[(&str, &str)] = &[("phase", phase.as_str())];
            gauge(
                enc,
                "migration_active",
                "An outgoing migration runs, in this phase",
                None,
                &[(l, 1.0)],
            )?;
            gauge(
                enc,
                "migration_pages_sent",
                "Pages sent by the migration in flight",
                None,
                &[(&[], p.pages_sent as f64)],
            )?;
            gauge(
                enc,
                "migration_pages_pending",
                "Pages the migration in flight has queued and not sent, or (pre-copy) sent and not yet confirmed by the destination",
                None,
                &[(&[], p.pages_pending as f64)],
            )?;
            gauge(
                enc,
                "migration_rounds",
                "Rounds of the migration in flight",
                None,
                &[(&[], f64::from(p.rounds))],
            )?;
            gauge(
                enc,
                "migration_rate",
                "Send rate of the migration in flight",
                Some(&Unit::Other("bytes_per_second".into())),
                &[(&[], p.rate_bytes_per_sec as f64)],
            )?;
        }
        Ok(())
    }

    fn encode_services(
        &self,
        enc: &mut DescriptorEncoder,
        manager: &ServiceManager,
    ) -> std::fmt::Result {
        let list = manager.list();
        let names: Vec<[(&str, &str); 1]> = list
            .iter()
            .map(|s| [("service", s.name.as_str())])
            .collect();
        let per = |f: &dyn Fn(&l1_services::ServiceInfo) -> u64| -> Vec<(&[(&str, &str)], u64)> {
            names
                .iter()
                .zip(&list)
                .map(|(l, s)| (&l[..], f(s)))
                .collect()
        };
        let up: Vec<(&[(&str, &str)], f64)> = names
            .iter()
            .zip(&list)
            .map(|(l, s)| {
                (
                    &l[..],
                    if matches!(s.state, ServiceState::Attached) {
                        1.0
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        gauge(
            enc,
            "service_up",
            "1 for an attached service, 0 for one that failed",
            None,
            &up,
        )?;
        counter(
            enc,
            "service_events",
            "Events delivered to each service",
            None,
            &per(&|s| s.stats.events),
        )?;
        counter(
            enc,
            "service_calls",
            "Control-API calls each service served",
            None,
            &per(&|s| s.stats.calls),
        )?;
        let mem: Vec<(&[(&str, &str)], f64)> = per(&|s| s.stats.memory_bytes)
            .into_iter()
            .map(|(l, v)| (l, v as f64))
            .collect();
        gauge(
            enc,
            "service_memory",
            "Wasm linear memory each service holds (it never shrinks; 0 for native)",
            Some(&Unit::Bytes),
            &mem,
        )?;
        counter(
            enc,
            "service_deferred_writes",
            "Port writes queued while the service waited on vCPUs",
            None,
            &per(&|s| s.stats.deferred),
        )?;
        let mut h = enc.encode_descriptor(
            "service_event_handler",
            "Time in each service's event handler (one event in 16 is timed)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (l, s) in names.iter().zip(&list) {
            let cum = &s.stats.event_ns_buckets;
            let Some(&count) = cum.last() else { continue };
            let buckets: Vec<(f64, u64)> = EVENT_NS_BOUNDS
                .iter()
                .map(|&b| b as f64 / 1e9)
                .chain([f64::INFINITY])
                .zip(cum.iter().copied())
                .collect();
            // Buckets are non-cumulative in the encoder's input.
            let mut prev = 0;
            let buckets: Vec<(f64, u64)> = buckets
                .into_iter()
                .map(|(b, c)| {
                    let n = c - prev;
                    prev = c;
                    (b, n)
                })
                .collect();
            h.encode_family(&l.to_vec())?
                .encode_histogram::<NoLabelSet>(
                    s.stats.event_ns_timed_sum as f64 / 1e9,
                    count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}
