#!/usr/bin/env bash
# Cross-build an optimized, stripped ferry for a Raspberry Pi target from an x86-64 Debian
# machine, and optionally package it as a .deb.
#
#   deploy/build-cross.sh aarch64-unknown-linux-gnu          # Pi 3/4/5, 64-bit
#   deploy/build-cross.sh armv7-unknown-linux-gnueabihf      # Pi 2/3/Zero 2, 32-bit
#   deploy/build-cross.sh x86_64-unknown-linux-gnu           # amd64 edge boxes (native)
#   DEB=1 deploy/build-cross.sh aarch64-unknown-linux-gnu    # also build the .deb
#
# It installs Debian's cross gcc/g++, adds the Rust target, and sets the linker and C
# compilers through the environment. librdkafka (bundled) and OpenSSL (vendored) are built
# from source for the target by their -sys crates. Output: target/<triple>/release/ferry
# (under $CARGO_TARGET_DIR when set).
#
# Size (BENCHMARKS.md "Edge binary" has the figures): the release profile is used
# as is (fat LTO, one codegen unit, stripped, opt-level 3). Two things are added here:
# - librdkafka is compiled with -ffunction-sections -fdata-sections (its mklove configure
#   does not add them, unlike the cc crate for the other C libraries), so the linker's
#   --gc-sections drops what ferry never calls, e.g. the admin API: -0.66 MB on aarch64.
# - ARM targets link with the toolchain's rust-lld and pack the PIE's relative relocations
#   (DT_RELR, -z pack-relative-relocs): -0.92 MB on aarch64. The binary then needs glibc
#   2.36 or newer (Pi OS / Debian 12 bookworm or later; the .deb's libc6 dependency says
#   so). Debian's GNU ld 2.40 ignores the option on aarch64, hence lld.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:?usage: deploy/build-cross.sh TARGET}"
case "$target" in
    aarch64-unknown-linux-gnu)      gnu=aarch64-linux-gnu;   deb_arch=arm64 ;;
    armv7-unknown-linux-gnueabihf)  gnu=arm-linux-gnueabihf; deb_arch=armhf ;;
    x86_64-unknown-linux-gnu)       gnu="";                  deb_arch=amd64 ;;
    *) echo "unsupported target: $target" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ -n "$gnu" ]; then
    if ! command -v "$gnu-gcc" >/dev/null 2>&1 || ! command -v "$gnu-g++" >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "gcc-$gnu" "g++-$gnu" "libc6-dev-$deb_arch-cross" >/dev/null
    fi
    rustup target add "$target" >/dev/null
    triple_env=$(echo "$target" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${triple_env}_LINKER=$gnu-gcc"
    export "CC_${target//-/_}=$gnu-gcc"
    export "CXX_${target//-/_}=$gnu-g++"
    export "AR_${target//-/_}=$gnu-ar"
    # librdkafka's own configure script (mklove) reads plain CC/CXX/AR; host build scripts
    # keep the native compiler through HOST_CC/HOST_CXX.
    export CC="$gnu-gcc" CXX="$gnu-g++" AR="$gnu-ar" HOST_CC=gcc HOST_CXX=g++
    # rust-lld ships with rustc; gcc-ld/ holds the ld.lld that `gcc -fuse-ld=lld` runs.
    gcc_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"
    [ -x "$gcc_ld/ld.lld" ] || { echo "rust-lld not found in $gcc_ld" >&2; exit 1; }
    rustflags="-C link-arg=-fuse-ld=lld -C link-arg=-B$gcc_ld -C link-arg=-Wl,-z,pack-relative-relocs"
    # LINK_MAP=FILE: also write the linker's map, which names every input section (each Rust
    # function, each C object) with its size: where the binary's bytes go. It changes the
    # flags, so the build starts over.
    [ -z "${LINK_MAP:-}" ] || rustflags="$rustflags -C link-arg=-Wl,-Map=$LINK_MAP"
    export "CARGO_TARGET_${triple_env}_RUSTFLAGS=$rustflags"
    [ -z "${RUSTFLAGS:-}" ] || echo "warning: RUSTFLAGS is set and replaces the link flags above" >&2
fi
# rdkafka-sys hands CFLAGS to librdkafka's configure; the cc crate (OpenSSL, zstd, zlib,
# ring) already uses these two flags, so for them nothing changes.
# -UECP_SM2P256_ASM: OpenSSL's aarch64 assembler for the SM2 curve comes with a 512 KiB
# precomputed table that the curve list references. Undefining it (user CFLAGS come after
# OpenSSL's own defines) leaves SM2 to the generic code and lets --gc-sections drop the
# table; no endpoint ferry talks to (Kafka, MQTT, the clouds) offers SM2. openssl-src has no
# switch for it, and -DOPENSSL_NO_SM2 does not build.
export CFLAGS="${CFLAGS:+$CFLAGS }-ffunction-sections -fdata-sections -UECP_SM2P256_ASM"

start=$(date +%s)
cargo build --release --locked --target "$target" --bin ferry
end=$(date +%s)
bin="${CARGO_TARGET_DIR:-target}/$target/release/ferry"
size=$(stat -c %s "$bin")
echo "built $bin: $size bytes in $((end - start)) s"
# The budget for the Pi binary with every uplink type (Kafka, MQTT, Kinesis, Pub/Sub): 16 MB.
if [ "$target" = aarch64-unknown-linux-gnu ] && [ "$size" -gt 16000000 ]; then
    echo "warning: $bin is over the 16 MB (16000000 bytes) budget" >&2
fi

if [ "${DEB:-0}" = "1" ]; then
    if ! command -v cargo-deb >/dev/null 2>&1; then
        cargo install --locked cargo-deb --version "^3" >/dev/null
    fi
    cargo deb -p ferry-gateway --target "$target" --no-build --no-strip
    ls -l "${CARGO_TARGET_DIR:-target}/$target"/debian/*.deb
fi
