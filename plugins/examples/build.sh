#!/usr/bin/env bash
# Builds the example service (port-counter) in its three languages, from source, into
# <out>/port-counter-{rust,python,js}.wasm (and <out>/libport-counter-rust.so):
#   - Rust: part of the plugins' Cargo workspace, already built by plugins/build.sh (which
#     calls this script with the cargo target dir and profile directory as arguments);
#   - Python: componentize-py, pinned below, installed with pip into a venv in the cache;
#   - JavaScript: ComponentizeJS, pinned below, installed with npm into the cache.
# The toolchains live in SPANVMM_TOOLCHAINS_DIR (default ~/.cache/spanvmm-toolchains) and are
# installed once per pinned version. A language whose toolchain cannot be installed is skipped
# with the reason on stderr, except with CI=true, where that is a failure.
# A component is rebuilt only when its source, the WIT or the toolchain version changed.
set -euo pipefail

COMPONENTIZE_PY=0.25.1
COMPONENTIZE_JS=0.23.0

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${SPANVMM_PLUGINS_OUT:-$repo/target/plugins}
build=${1:?usage: build.sh CARGO_TARGET_DIR PROFILE_DIR}
pdir=${2:?usage: build.sh CARGO_TARGET_DIR PROFILE_DIR}
tools=${SPANVMM_TOOLCHAINS_DIR:-$HOME/.cache/spanvmm-toolchains}
wit=$repo/sdk/wit
src=$here/port-counter
mkdir -p "$out" "$tools"

put() { # <src> <dst>: atomic, a running VMM may have the old file open
    [ -f "$1" ] || { echo "examples/build.sh: expected $1 after the build" >&2; exit 1; }
    cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
}
missing() { # <language> <reason>
    if [ "${CI:-}" = true ]; then
        echo "examples/build.sh: cannot build the $1 example: $2 (CI=true: a failure)" >&2
        exit 1
    fi
    echo "examples/build.sh: SKIPPING the $1 example: $2" >&2
}
# True when <out file> is older than what it is built from (recorded as a hash beside it).
stale() { # <out file> <toolchain version> <source file>
    local h
    h=$( (echo "$2"; cat "$3"; cat "$wit"/*.wit) | sha256sum | cut -d' ' -f1)
    [ -f "$1" ] && [ "$(cat "$1.src-sha256" 2>/dev/null)" = "$h" ] && return 1
    echo "$h" > "$1.want-sha256"
}
done_with() { mv -f "$1.want-sha256" "$1.src-sha256"; }

put "$build/wasm32-wasip2/$pdir/port_counter.wasm" "$out/port-counter-rust.wasm"
put "$build/$pdir/libport_counter.so" "$out/libport-counter-rust.so"

# Installs a toolchain into DIR once, with the command after it (run with DIR as $1). The
# marker is written last: an interrupted install is redone, not used.
install_once() {
    local dir=$1
    shift
    [ -f "$dir/.installed" ] && return 0
    rm -rf "$dir"
    if "$@" "$dir"; then touch "$dir/.installed"; else rm -rf "$dir"; fi
}
install_py() {
    command -v python3 >/dev/null && python3 -m venv "$1" \
        && "$1/bin/pip" install -q "componentize-py==$COMPONENTIZE_PY"
}
install_js() {
    command -v npm >/dev/null && mkdir -p "$1" \
        && npm install --prefix "$1" --no-audit --no-fund --loglevel=error --save-exact \
            "@bytecodealliance/componentize-js@$COMPONENTIZE_JS" >/dev/null
}

# Python.
py=$tools/componentize-py-$COMPONENTIZE_PY
install_once "$py" install_py
f=$out/port-counter-python.wasm
if [ ! -f "$py/.installed" ]; then
    missing Python "componentize-py $COMPONENTIZE_PY could not be installed with pip (python3 -m venv)"
elif stale "$f" "componentize-py $COMPONENTIZE_PY" "$src/python/app.py"; then
    (cd "$src/python" && "$py/bin/componentize-py" -d "$wit" -w service componentize \
        -p "$src/python" app -o "$f.tmp.$$" >/dev/null)
    mv -f "$f.tmp.$$" "$f"
    done_with "$f"
fi

# JavaScript.
js=$tools/componentize-js-$COMPONENTIZE_JS
cjs=$js/node_modules/.bin/componentize-js
install_once "$js" install_js
f=$out/port-counter-js.wasm
if [ ! -f "$js/.installed" ]; then
    missing JavaScript "ComponentizeJS $COMPONENTIZE_JS could not be installed with npm"
elif stale "$f" "componentize-js $COMPONENTIZE_JS" "$src/js/app.js"; then
    # No HTTP: the host offers no wasi:http (deny-by-default WASI, docs/plugin-guide.md).
    "$cjs" "$src/js/app.js" -w "$wit" -n service -d http fetch-event -o "$f.tmp.$$" >/dev/null
    mv -f "$f.tmp.$$" "$f"
    done_with "$f"
fi
