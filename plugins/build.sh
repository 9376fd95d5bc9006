#!/usr/bin/env bash
# Builds every spanvmm plugin twice from the same source:
#   - as a Wasm component (plain `cargo build --target wasm32-wasip2`: rustc links the component
#     itself; its WASI imports are served deny-by-default by the host)
#   - as a native shared object (host target, cdylib)
# into <repo>/target/plugins/<name>.wasm and <repo>/target/plugins/lib<name>.so, where <name> is
# the plugin's directory name (exit-stats, introspect, misbehave, ...), plus the SDK template
# (sdk/template) as "template".
#
# The plugins have their own Cargo workspace and their own target directory (target/plugins-build
# by default): a nested cargo sharing the VMM's target directory would wait on its lock forever.
#
# Environment: SPANVMM_PLUGINS_OUT (output dir), SPANVMM_PLUGINS_TARGET_DIR (cargo target dir),
# SPANVMM_PLUGINS_JOBS (default 2), SPANVMM_CARGO (default cargo), SPANVMM_PLUGINS_PROFILE
# (release, the default, or dev).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=${SPANVMM_PLUGINS_OUT:-$repo/target/plugins}
build=${SPANVMM_PLUGINS_TARGET_DIR:-$repo/target/plugins-build}
jobs=${SPANVMM_PLUGINS_JOBS:-2}
cargo=${SPANVMM_CARGO:-cargo}
profile=${SPANVMM_PLUGINS_PROFILE:-release}
case $profile in
    release) pdir=release ;;
    dev) pdir=debug ;;
    *) echo "build.sh: SPANVMM_PLUGINS_PROFILE must be release or dev" >&2; exit 2 ;;
esac

cd "$here"
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/wasm32-wasip2" ]; then
    echo "build.sh: the Rust target wasm32-wasip2 is not installed (rustup target add wasm32-wasip2)" >&2
    exit 1
fi

# Unset what a calling cargo (e.g. a test) may have exported and would leak into ours.
unset CARGO_TARGET_DIR RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET

build_both() { # <dir with Cargo.toml>
    (cd "$1" &&
        "$cargo" build --profile "$profile" -j "$jobs" --target wasm32-wasip2 \
            --target-dir "$build" --quiet &&
        "$cargo" build --profile "$profile" -j "$jobs" --target-dir "$build" --quiet)
}

build_both "$here"
build_both "$repo/sdk/template"

mkdir -p "$out"
# Atomic replace: a running VMM may have the old shared object mapped.
put() { # <src> <dst>
    [ -f "$1" ] || { echo "build.sh: expected $1 after the build" >&2; exit 1; }
    cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
}
for dir in exit-stats netmon introspect checkpoint agile hostile/misbehave hostile/abi-mismatch hostile/missing-export hostile/greedy \
           precopy postcopy hybrid scatter-gather ../sdk/template; do
    crate=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -1)
    file=${crate//-/_}
    name=$(basename "$dir")
    put "$build/wasm32-wasip2/$pdir/$file.wasm" "$out/$name.wasm"
    put "$build/$pdir/lib$file.so" "$out/lib$name.so"
done
# The example service in Rust (built above), Python and JavaScript.
SPANVMM_PLUGINS_OUT=$out bash "$here/examples/build.sh" "$build" "$pdir"
echo "plugins built in $out:" $(cd "$out" && ls)
