#!/usr/bin/env bash
# Builds every spanvmm plugin twice from the same source:
#   - as a Wasm component (wasm32-unknown-unknown, linked by wasm-component-ld; no WASI imports)
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
sysroot=$(rustc --print sysroot)
hostt=$(rustc -vV | sed -n 's/^host: //p')
linker=$sysroot/lib/rustlib/$hostt/bin/wasm-component-ld
if [ ! -x "$linker" ]; then
    linker=$(command -v wasm-component-ld || true)
fi
if [ -z "$linker" ]; then
    echo "build.sh: wasm-component-ld not found (looked in $sysroot/lib/rustlib/$hostt/bin and PATH);" \
         "run shared/toolchain/install-wasm-toolchain.sh" >&2
    exit 1
fi

# Unset what a calling cargo (e.g. a test) may have exported and would leak into ours.
unset CARGO_TARGET_DIR RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET

build_both() { # <dir with Cargo.toml>
    (cd "$1" &&
        CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=$linker \
            "$cargo" build --profile "$profile" -j "$jobs" --target wasm32-unknown-unknown \
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
for dir in exit-stats introspect checkpoint hostile/misbehave hostile/abi-mismatch hostile/missing-export hostile/greedy \
           precopy postcopy hybrid ../sdk/template; do
    crate=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -1)
    file=${crate//-/_}
    name=$(basename "$dir")
    put "$build/wasm32-unknown-unknown/$pdir/$file.wasm" "$out/$name.wasm"
    put "$build/$pdir/lib$file.so" "$out/lib$name.so"
done
echo "plugins built in $out:" $(cd "$out" && ls)
