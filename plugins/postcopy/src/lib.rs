//! postcopy: the guest runs at the destination at once; every page follows exactly once,
//! faulted pages and their neighbourhood first (adaptive pre-paging, see `migration-policy`).

use spanvmm_sdk::Capability;

migration_policy::migration_service!(
    Postcopy,
    "postcopy",
    migration_policy::Mode::Postcopy,
    &[Capability::DrivesMigration]
);
