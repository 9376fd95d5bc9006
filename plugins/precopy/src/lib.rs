//! precopy: iterative pre-copy rounds over the dirty log, then stop-and-copy (see
//! `migration-policy` for the stop rule).

use spanvmm_sdk::Capability;

migration_policy::migration_service!(
    Precopy,
    "precopy",
    migration_policy::Mode::Precopy,
    &[Capability::DrivesMigration, Capability::DirtyLog]
);
