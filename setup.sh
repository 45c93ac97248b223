#!/usr/bin/env bash
# One idempotent setup for a fresh Debian 12 machine (run as root):
#   - Debian's QEMU 7.2 and the tools the test guests are built with;
#   - QEMU 10.0.x from bookworm-backports, extracted into .deps/ with a wrapper;
#   - QEMU 11.1.x from trixie-backports with its own library root, and a wrapper;
#   - a Debian kernel extracted into .deps/ for the linuxguest;
#   - the fixture guests in qemu-fixtures/build/;
#   - a venv in .venv/ with liveupgrade installed editable, with test tools.
# Each step is skipped when its result is already there.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
deps=$root/.deps
mkdir -p "$deps"
log() { printf 'setup: %s\n' "$*" >&2; }

# --- 1. Debian packages ---------------------------------------------------
packages=(qemu-system-x86 qemu-utils busybox-static gcc libc6-dev make cpio xz-utils python3-venv
          iproute2 iputils-ping libvirt-daemon-system libvirt-clients libvirt-dev pkg-config patchelf)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- 2. QEMU 10.0.x from bookworm-backports, in a private apt state ---------
# The mirror is the one this machine's apt already uses; no host is named here.
mirror_uri() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        if grep -qE '^Suites:.*\bbookworm\b' "$f"; then
            uri=$(awk '/^URIs:/{print $2; exit}' "$f")
            [ -n "$uri" ] && { echo "$uri"; return; }
        fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    return 1
}
# apt-get or apt-cache ($2) on a private apt state in folder $1 (its own
# sources.list, lists and cache, no installed packages): the system's apt is never
# touched. Call private_apt_state first.
apt_in() {
    local state=$1 tool=$2
    shift 2
    "$tool" -o Dir::Etc::SourceList="$state/sources.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache" \
        -o Dir::State::status=/dev/null "$@"
}
private_apt_state() {  # FOLDER SUITE...: sources for those suites of this machine's mirror
    local state=$1 uri suite
    shift
    uri=$(mirror_uri) || { log "no Debian mirror found in /etc/apt sources"; exit 1; }
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    for suite in "$@"; do echo "deb $uri $suite main"; done > "$state/sources.list"
    log "reading $* from $uri"
    apt_in "$state" apt-get update -q
}
newest() {  # STATE PREFIX: the newest version of qemu-system-x86 starting with PREFIX
    apt_in "$1" apt-cache madison qemu-system-x86 | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
        | grep -E "^1:${2//./\\.}\\." | head -n 1
}
# .deps/bin/qemu-system-x86_64-NAME runs the QEMU extracted under ROOT with its own
# modules ("Only modules from the same build can be loaded"). Written only when it
# changes: liveupgrade's probe cache is keyed by the wrapper's mtime.
qemu_wrapper() {  # NAME ROOT WHAT [ARGUMENT...]
    local file=$deps/bin/qemu-system-x86_64-$1 text
    text="#!/bin/sh
# $3, extracted by setup.sh.
QEMU_MODULE_DIR=$2/usr/lib/x86_64-linux-gnu/qemu
export QEMU_MODULE_DIR
exec $2/usr/bin/qemu-system-x86_64 ${*:4}${4:+ }\"\$@\""
    if [ ! -f "$file" ] || [ "$(cat "$file")" != "$text" ]; then
        printf '%s\n' "$text" > "$file"
        chmod 0755 "$file"
    fi
}
mkdir -p "$deps/bin"
qemu10=$deps/qemu-10.0
# Every module package too: QEMU looks a module up in QEMU_MODULE_DIR, then in
# the system's folder, and a 7.2 module found there aborts a 10.0 QEMU
# (qom-list-types loads every module).
qemu10_packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui
                 qemu-system-modules-opengl qemu-system-modules-spice qemu-block-extra)
qemu10_stamp=$qemu10/complete-$(echo "${qemu10_packages[*]}" | md5sum | cut -c1-8)
if [ ! -f "$qemu10_stamp" ]; then
    private_apt_state "$deps/apt" bookworm-backports
    version=$(newest "$deps/apt" 10.0)
    [ -n "$version" ] || { log "bookworm-backports has no QEMU 10.0.x"; exit 1; }
    rm -rf "$qemu10" && mkdir -p "$qemu10/debs"
    chmod 0777 "$qemu10/debs"  # apt's download sandbox user writes here
    (cd "$qemu10/debs" && apt_in "$deps/apt" apt-get download -q "${qemu10_packages[@]/%/=$version}")
    for deb in "$qemu10"/debs/*.deb; do dpkg -x "$deb" "$qemu10/root"; done
    echo "$version" > "$qemu10/version"
    touch "$qemu10_stamp"
fi
# Firmware: 10.0's built-in data dir is /usr/share/qemu (Debian 12's seabios and
# ipxe ROMs), so ROM sizes match a QEMU 7.2 source's and migration accepts them.
qemu_wrapper 10.0 "$qemu10/root" "QEMU 10.0 from bookworm-backports"
ln -sf /usr/bin/qemu-system-x86_64 "$deps/bin/qemu-system-x86_64-7.2"

# --- 2b. QEMU 11.1.x from trixie-backports, with a private runtime root -----
# Built for Debian 13 (glibc >= 2.38, t64 libraries), so unlike 10.0 it cannot
# run on Debian 12's libraries: its whole library closure is extracted beside it
# (apt-cache depends --recurse, the lib*/gcc-* packages), and the binary's
# interpreter and DT_RPATH point there (DT_RPATH, not RUNPATH: RUNPATH does not
# serve the libraries' own dependencies). Its SDL modules are dropped (a headless
# host has no SDL3; qom-list-types would fail loading them).
qemu11=$deps/qemu-11.1
qemu11_packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-system-gui
                 qemu-system-modules-opengl qemu-block-extra)
qemu11_stamp=$qemu11/complete-$(echo "${qemu11_packages[*]}" | md5sum | cut -c1-8)
if [ ! -f "$qemu11_stamp" ]; then
    private_apt_state "$deps/apt11" trixie trixie-backports
    version=$(newest "$deps/apt11" 11.1)
    [ -n "$version" ] || { log "trixie-backports has no QEMU 11.1.x"; exit 1; }
    closure=$(apt_in "$deps/apt11" apt-cache depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances "${qemu11_packages[@]/%/=$version}" \
        | grep -E '^(lib|gcc)' | sort -u)
    rm -rf "$qemu11" && mkdir -p "$qemu11/debs"
    chmod 0777 "$qemu11/debs"  # apt's download sandbox user writes here
    # shellcheck disable=SC2086  # one package name per word
    (cd "$qemu11/debs" && apt_in "$deps/apt11" apt-get download -q \
        "${qemu11_packages[@]/%/=$version}" $closure)
    for deb in "$qemu11"/debs/*.deb; do dpkg -x "$deb" "$qemu11/root"; done
    rm -rf "$qemu11/debs"
    lib=$qemu11/root/usr/lib/x86_64-linux-gnu
    patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath \
        --set-rpath "$lib:$lib/pulseaudio" "$qemu11/root/usr/bin/qemu-system-x86_64"
    rm -f "$lib/qemu/ui-sdl.so" "$lib/qemu/audio-sdl.so"
    echo "$version" > "$qemu11/version"
    touch "$qemu11_stamp"
fi
# Option ROMs (efi-virtio.rom ...): 11.1 searches /usr/share/qemu and /usr/share/seabios,
# and Debian 12 keeps them in /usr/lib/ipxe/qemu (7.2 and 10.0 look there), so the
# wrapper names that folder with -L: the same ROMs, the same sizes on both sides.
qemu_wrapper 11.1 "$qemu11/root" "QEMU 11.1 from trixie-backports with its own Debian 13 library root" \
    -L /usr/lib/ipxe/qemu

# --- 3. A Debian kernel for the linuxguest (extracted, /boot untouched) -----
kernel=$deps/kernel
if [ ! -d "$kernel/lib/modules" ]; then
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    [ -n "$kpkg" ] || { apt-get update -q; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}'); }
    log "extracting $kpkg"
    rm -rf "$kernel" && mkdir -p "$kernel.debs" && chmod 0777 "$kernel.debs"
    (cd "$kernel.debs" && apt-get download -q "$kpkg")
    dpkg -x "$kernel.debs"/*.deb "$kernel"
    rm -rf "$kernel.debs"
fi

# --- 4. Fixture guests --------------------------------------------------------
make -s -C "$root/qemu-fixtures/microguest" OUT="$root/qemu-fixtures/build"
lg=$root/qemu-fixtures/build/linuxguest-initrd.gz
if [ ! -f "$lg" ] || [ -n "$(find "$root/qemu-fixtures/linuxguest" "$root/qemu-fixtures/common" -newer "$lg" -type f)" ]; then
    log "building the linuxguest"
    "$root/qemu-fixtures/linuxguest/build.sh" "$kernel" "$root/qemu-fixtures/build"
fi

# --- 5. Python venv -------------------------------------------------------------
if [ ! -x "$root/.venv/bin/python" ]; then
    log "creating .venv"
    python3 -m venv "$root/.venv"
fi
stamp=$root/.venv/.liveupgrade-installed
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
    "$root/.venv/bin/pip" install -q --upgrade pip
    # A plain path entry (compat) rather than setuptools' import-hook finder, which
    # costs every Python process ~10 ms at start-up; compat is transitional in
    # setuptools, so fall back to the default editable install where it is gone.
    "$root/.venv/bin/pip" install -q -e "$root[test,bench,libvirt]" \
        --config-settings editable_mode=compat 2>/dev/null \
        || "$root/.venv/bin/pip" install -q -e "$root[test,bench,libvirt]"
    touch "$stamp"
fi
# Byte-compile the package, as pip or dpkg do for an installed one: these machines
# set PYTHONDONTWRITEBYTECODE, so an editable checkout would otherwise be compiled
# from source by every process (~60 ms of each `liveupgrade` command's start-up).
# Python still checks each .pyc against its source, so an edited file is never stale.
"$root/.venv/bin/python" -m compileall -q "$root/liveupgrade"
log "ready: QEMU 7.2 $(/usr/bin/qemu-system-x86_64 --version | head -n 1 | awk '{print $4}'), QEMU $(cat "$qemu10/version"), QEMU $(cat "$qemu11/version")"
