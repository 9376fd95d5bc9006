//! Links with our own script: fixed addresses for the static page tables, GDT and TSS, and a
//! PT_NOTE segment for the PVH and direct-entry notes.
//!
//! The script is copied into OUT_DIR and linked from there: cargo may reuse this build script's
//! output for a clone at another path that shares the target directory, and a path into the
//! clone would then point at a checkout that may no longer exist.

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let script = format!("{out}/linker.ld");
    std::fs::copy("linker.ld", &script).expect("copy linker.ld into OUT_DIR");
    println!("cargo:rustc-link-arg-bins=-T{script}");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=src/boot.S");
}
