//! hybrid: a bounded number of pre-copy rounds, then post-copy (see `migration-policy`).

use spanvmm_sdk::Capability;

migration_policy::migration_service!(
    Hybrid,
    "hybrid",
    migration_policy::Mode::Hybrid,
    &[Capability::DrivesMigration, Capability::DirtyLog]
);
