//! A smoke campaign of `spanvmm-bench chaos` (fault injection at scale): three runs of each
//! category with a fixed seed, on real KVM with real `spanvmm` processes, so CI exercises the
//! harness. The harness itself checks every run's mechanisms (the VMM's statuses, exit codes,
//! `ctl` messages, the guest's `verify` lines, processes and sockets left behind); this test
//! asserts that no run was lost, that each ended in one of its category's outcomes, and that
//! wherever the guest ran on it stalled no longer than the outcome's mechanism allows (the
//! downtime, the faults, the rollback, the operator's resume, the time since the save, plus a
//! busy host's slack). On busy cores the faults land at other points of the protocols, which
//! changes the mix of outcomes, never whether one is allowed.

#[allow(dead_code)]
#[path = "../bench/src/chaos.rs"]
mod chaos;

use std::path::{Path, PathBuf};

fn guest() -> PathBuf {
    let p = std::env::var_os("SPANGUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-images/spanguest.elf")
        });
    assert!(
        p.exists(),
        "spanguest not found at {} — build it with guest-images/build.sh",
        p.display()
    );
    p
}

#[test]
fn a_smoke_campaign_of_injected_faults_loses_no_vm() {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/plugins");
    assert!(
        plugins.join("precopy.wasm").exists(),
        "{} missing — run plugins/build.sh",
        plugins.display()
    );
    let cfg = chaos::Config {
        spanvmm: PathBuf::from(env!("CARGO_BIN_EXE_spanvmm")),
        guest: guest(),
        plugins,
        counts: chaos::Counts {
            precopy: 3,
            postcopy_cut: 3,
            postcopy_death: 3,
            live_update: 3,
            snapshot: 3,
        },
        seed: 19,
        verbose: true,
    };
    let report = chaos::campaign(&cfg).expect("the campaign ran");
    eprint!("{}", chaos::table(&report));
    assert_eq!(report.seed, 19);
    assert_eq!(report.total_runs, 15, "{}", chaos::table(&report));
    assert_eq!(report.total_lost, 0, "{}", chaos::table(&report));
    let allowed: &[(&str, &[&str])] = &[
        (
            "precopy",
            &[
                "failed-source-runs",
                "in-doubt-resumed",
                "in-doubt-destination-runs",
                "completed-before-fault",
                "completed-then-killed (race)",
            ],
        ),
        (
            "postcopy-cut",
            &[
                "recovered",
                "completed-without-reconnect",
                "completed-before-fault",
            ],
        ),
        (
            "postcopy-death",
            &[
                "reported-source-paused",
                "completed-before-fault",
                "completed-then-killed (race)",
            ],
        ),
        (
            "live-update",
            &[
                "rollback",
                "completed",
                "in-doubt, resumed with --force",
                "completed-then-killed (race)",
            ],
        ),
        (
            "snapshot",
            &[
                "no-layer-yet",
                "torn-layer-refused",
                "torn-layer-restores-clean",
                "layer-complete-restores",
            ],
        ),
    ];
    for (c, (name, outcomes)) in report.categories.iter().zip(allowed) {
        assert_eq!(c.name, *name);
        assert_eq!(c.runs, 3, "{name}");
        assert_eq!(c.survived, 3, "{name}");
        for r in &c.records {
            assert!(
                outcomes.iter().any(|o| r.outcome.starts_with(o)),
                "{name} #{}: unexpected outcome {:?} ({})",
                r.run,
                r.outcome,
                r.detail
            );
            // Wherever the guest ran on, it stalled no longer than its outcome's mechanism
            // allows (the harness's bound: downtime, faults, rollback, resume, save).
            if r.outcome.contains("(race)") {
                continue; // the guest died with its only home: nothing ran on
            }
            let s = r
                .stall
                .as_ref()
                .unwrap_or_else(|| panic!("{name} #{}: no stall recorded ({})", r.run, r.outcome));
            assert!(
                s.guest_ms < s.bound_ms,
                "{name} #{} ({}): the guest stalled {:.1} ms, bound {:.0} ms ({})",
                r.run,
                r.outcome,
                s.guest_ms,
                s.bound_ms,
                s.by
            );
        }
    }
    // Nothing of the campaign is left: its scratch directory is removed when nothing was lost.
    let root = std::env::temp_dir().join(format!("spanvmm-chaos-{}", std::process::id()));
    assert!(!root.exists(), "{} left behind", root.display());
}
