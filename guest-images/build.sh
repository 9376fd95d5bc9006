#!/usr/bin/env bash
# Builds spanguest (release) and puts it at <repo>/target/guest-images/spanguest.elf.
# The intermediate build honours CARGO_TARGET_DIR; the final file's place never changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
crate="$here/spanguest"
out_dir="$repo/target/guest-images"

cargo=(cargo)
if command -v rustup >/dev/null 2>&1; then
    cargo=(cargo +1.95.0)
fi

# A relative CARGO_TARGET_DIR means relative to where we were called from: make it absolute
# before moving into the crate.
target_dir="${CARGO_TARGET_DIR:-$crate/target}"
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
export CARGO_TARGET_DIR="$target_dir"

# Run from the crate so its .cargo/config.toml (target, static relocation model) applies.
cd "$crate"
"${cargo[@]}" build --release --locked --target x86_64-unknown-none

mkdir -p "$out_dir"
cp "$target_dir/x86_64-unknown-none/release/spanguest" "$out_dir/spanguest.elf.tmp"
mv "$out_dir/spanguest.elf.tmp" "$out_dir/spanguest.elf"
echo "$out_dir/spanguest.elf"
