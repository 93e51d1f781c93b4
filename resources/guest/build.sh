#!/usr/bin/env bash
# Builds the test guest from Debian packages only (see README.md beside this file):
#   vmlinux + bzImage   Debian's linux-source-6.12, tinyconfig + kernel.config + patches/*.patch
#   initramfs.cpio      uncompressed newc: /init = tests/guest-agent (static) and nothing else,
#                       because every MiB costs seconds of emulated unpacking per boot on a PVM host
#   initramfs-fio.cpio  the same plus /usr/bin/fio (static, from Debian's fio source package),
#                       for the boots that run fio
#   busybox.cpio        /bin/busybox (busybox-static) + applet links, an overlay for debugging:
#                       `cat initramfs.cpio busybox.cpio >debug.cpio` (Linux unpacks both)
#   rootfs.ext4         initramfs-fio.cpio's files plus busybox as a 32 MiB ext4 image
#                       (mke2fs -d), for root=/dev/vda (a disk root costs no unpacking)
#
# Usage: resources/guest/build.sh              build if needed; last stdout line = output dir
#        resources/guest/build.sh --print-dir  print the output dir without building
#                                              (exit 1 if it is not built yet)
#
# Outputs: ${XDG_CACHE_HOME:-$HOME/.cache}/vmm-guest/<hash>/ with exactly vmlinux, bzImage,
# initramfs.cpio, initramfs-fio.cpio, busybox.cpio, rootfs.ext4, kernel.config, cmdline-pvm.txt,
# versions.txt. <hash> covers every input.
# Kernel, fio and agent are cached separately (kernel-<key>/, fio-<key>/, agent-<key>/) under
# keys of their own inputs, so changing the agent does not rebuild the kernel. Everything is
# built in a .tmp-* dir and renamed into place, so a half-built artifact never looks finished.
# Build trees and logs live in the cache's work/ dir. Progress goes to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
AGENT_DIR=$REPO/tests/guest-agent
FRAGMENT=$HERE/kernel.config
PATCH_DIR=$HERE/patches
PACKAGES_FILE=$HERE/host-packages.txt
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/vmm-guest
WORK=$CACHE/work
LOGS=$WORK/logs
LINUX_TARBALL=/usr/src/linux-source-6.12.tar.xz
RUST_TARGET=x86_64-unknown-linux-gnu
# mke2fs (e2fsprogs) is installed in /usr/sbin (/sbin), which is not on a non-root user's PATH
# on Debian: append them (appended, so no other tool, and no cache key, changes).
for d in /usr/sbin /sbin; do
    [[ :$PATH: == *:$d:* ]] || PATH=$PATH:$d
done
# Extra guest cmdline this PVM host needs (README.md beside this file, "The PVM host"). Not for real KVM.
declare -A ARTIFACT_KEYS
CMDLINE_PVM='emul_quirks clearcpuid=xsave,cx16,fsgsbase,invpcid,smap,popcnt,rdrand,rdseed'
# kernel.config asks for these =n, but other symbols select them (README.md).
KCONFIG_SELECTED_BY_OTHERS=(DEBUG_KERNEL PERF_EVENTS MICROCODE)
# busybox is only for interactive debugging (guest.checks=shell); tests never use it.
BUSYBOX_APPLETS=(sh ash cat cp dd df dmesg echo env find free grep head hexdump kill less ln ls
    mkdir mount mv od poweroff ps reboot rm sleep sort stat sync tail top umount uname vi wc)

log() { printf '[guest-build] %s\n' "$*" >&2; }
die() {
    printf '[guest-build] error: %s\n' "$*" >&2
    exit 1
}

# run_logged LOG CMD...: append CMD's output to LOG; on failure show the tail and stop.
run_logged() {
    local logfile=$1
    shift
    printf '\n$ %s\n' "$*" >>"$logfile"
    if ! "$@" >>"$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        die "failed: $* (full log: $logfile)"
    fi
}

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo missing; }
short_hash() { sha256sum | cut -c1-16; }

check_host_packages() {
    local p missing=()
    while read -r p; do
        [[ -z $p || $p == \#* ]] && continue
        dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
    done <"$PACKAGES_FILE"
    if ((${#missing[@]})); then
        die "missing Debian packages: ${missing[*]} (apt-get install \$(cat $PACKAGES_FILE))"
    fi
    command -v cargo >/dev/null || die "cargo not found (the guest agent needs a Rust toolchain)"
    command -v mke2fs >/dev/null || die "mke2fs not found (package e2fsprogs, in /usr/sbin)"
}

fio_source_version() {
    { apt-cache showsrc fio 2>/dev/null || true; } | awk '/^Version:/ {print $2}' | sort -V | tail -n 1
}

# apt-get source needs a deb-src entry: mirror debian.sources with Types: deb-src.
ensure_fio_source_listed() {
    FIO_SRC_VER=$(fio_source_version)
    [[ -n $FIO_SRC_VER ]] && return 0
    local src=/etc/apt/sources.list.d/debian.sources dst=/etc/apt/sources.list.d/deb-src.sources
    # scripts/setup-host.sh adds the entry first; this is for build.sh run on its own.
    local sudo_cmd=()
    if [[ $(id -u) != 0 ]]; then
        sudo -n true 2>/dev/null || die "no deb-src entry for fio: run scripts/setup-host.sh (it adds $dst with sudo)"
        sudo_cmd=(sudo -n)
    fi
    if [[ ! -e $dst ]]; then
        [[ -r $src ]] || die "cannot add a deb-src entry: $src not found"
        log "adding $dst (deb-src mirror of $src)"
        sed 's/^Types:.*/Types: deb-src/' "$src" | "${sudo_cmd[@]}" tee "$dst" >/dev/null
    fi
    mkdir -p "$LOGS"
    log "apt-get update (for deb-src)"
    run_logged "$LOGS/apt-update.log" "${sudo_cmd[@]}" apt-get update
    FIO_SRC_VER=$(fio_source_version)
    [[ -n $FIO_SRC_VER ]] || die "apt-cache showsrc fio finds no source package"
}

# ---------------------------------------------------------------------------------------------
# Kernel. Source tree: work/linux-<ver>-<patches key> (extracted + patched once, then renamed).
# Object tree: work/linux-build-<same> (kept for incremental rebuilds after config changes).
verify_kconfig() { # FRAGMENT DOTCONFIG
    local line sym val got bad=()
    while IFS= read -r line; do
        [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]] || continue
        sym=${BASH_REMATCH[1]}
        val=${BASH_REMATCH[2]}
        got=$(grep -E "^$sym=" "$2" || true)
        if [[ $val == n ]]; then
            [[ -z $got ]] && continue
            if [[ " ${KCONFIG_SELECTED_BY_OTHERS[*]} " == *" ${sym#CONFIG_} "* ]]; then
                log "note: $sym=n requested, but $got (selected by other symbols, expected)"
                continue
            fi
        elif [[ $got == "$sym=$val" ]]; then
            continue
        fi
        bad+=("$sym=$val requested, .config has: ${got:-not set}")
    done <"$1"
    if ((${#bad[@]})); then
        printf '  %s\n' "${bad[@]}" >&2
        die "${#bad[@]} kernel.config request(s) did not take effect (see above)"
    fi
}

build_kernel() { # OUTDIR
    local out=$1 tree=linux-${LINUX_SRC_VER//\~/_}-$PATCHES_KEY
    local src=$WORK/$tree obj=$WORK/$tree-build logfile=$LOGS/kernel.log p
    : >"$logfile"
    if [[ ! -d $src ]]; then
        local tmp=$WORK/.tmp-$tree.$$
        rm -rf "$tmp" && mkdir -p "$tmp"
        log "kernel: extracting $LINUX_TARBALL"
        run_logged "$logfile" tar -xf "$LINUX_TARBALL" -C "$tmp"
        for p in "${PATCHES[@]}"; do
            log "kernel: applying $(basename "$p")"
            run_logged "$logfile" patch -p1 --batch --forward -d "$tmp/linux-source-6.12" -i "$p"
        done
        mv -T "$tmp/linux-source-6.12" "$src"
        rm -rf "$tmp"
        # Source trees for other patch sets are 1.5 GB each: keep only the current one.
        find "$WORK" -maxdepth 1 -name 'linux-*' ! -name "$tree" ! -name "$tree-build" \
            -exec rm -rf {} +
    fi
    mkdir -p "$obj"
    log "kernel: configuring (tinyconfig + kernel.config)"
    run_logged "$logfile" make -C "$src" O="$obj" tinyconfig
    run_logged "$logfile" "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$FRAGMENT"
    run_logged "$logfile" make -C "$src" O="$obj" olddefconfig
    verify_kconfig "$FRAGMENT" "$obj/.config"
    log "kernel: make -j$(nproc) vmlinux bzImage (a few minutes; log: $logfile)"
    run_logged "$logfile" make -C "$src" O="$obj" -j"$(nproc)" vmlinux bzImage
    cp "$obj/vmlinux" "$out/vmlinux"
    cp "$obj/arch/x86/boot/bzImage" "$out/bzImage"
    cp "$obj/.config" "$out/kernel.config"
}

# ---------------------------------------------------------------------------------------------
# fio: Debian source package, static, only the fio binary. Tree: work/fio-<ver>.
build_fio() { # OUTDIR
    local out=$1 src=$WORK/fio-${FIO_SRC_VER//\~/_} logfile=$LOGS/fio.log
    : >"$logfile"
    if [[ ! -d $src ]]; then
        local tmp=$WORK/.tmp-fio.$$
        rm -rf "$tmp" && mkdir -p "$tmp"
        log "fio: apt-get source fio=$FIO_SRC_VER"
        (cd "$tmp" && run_logged "$logfile" apt-get source "fio=$FIO_SRC_VER")
        mv -T "$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'fio-*')" "$src"
        rm -rf "$tmp"
    fi
    log "fio: configure --build-static, make fio (log: $logfile)"
    # --disable-native: no -march=native, the binary must run on any x86-64 guest CPU.
    (cd "$src" && run_logged "$logfile" ./configure --build-static --disable-native)
    run_logged "$logfile" make -C "$src" -j"$(nproc)" fio
    file -b "$src/fio" | grep -Eq 'statically linked|static-pie linked' ||
        die "fio is not statically linked: $(file -b "$src/fio")"
    strip -o "$out/fio" "$src/fio"
}

# ---------------------------------------------------------------------------------------------
# Guest agent: static Rust binary, its own target dir under work/.
build_agent() { # OUTDIR
    local out=$1 target=$WORK/agent-target logfile=$LOGS/agent.log
    : >"$logfile"
    log "agent: cargo build --release (log: $logfile)"
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target run_logged "$logfile" \
        cargo build --release --locked --target "$RUST_TARGET" --manifest-path "$AGENT_DIR/Cargo.toml"
    local bin=$target/$RUST_TARGET/release/guest-agent
    file -b "$bin" | grep -Eq 'statically linked|static-pie linked' ||
        die "guest-agent is not statically linked: $(file -b "$bin")"
    cp "$bin" "$out/init"
}

# ---------------------------------------------------------------------------------------------
# stage_busybox DIR: /bin/busybox and its applet links under DIR.
stage_busybox() {
    local busybox a
    busybox=$(dpkg-query -L busybox-static | grep -E '/busybox$' | head -n 1)
    mkdir -p "$1/bin"
    install -m 0755 "$busybox" "$1/bin/busybox"
    for a in "${BUSYBOX_APPLETS[@]}"; do ln -s busybox "$1/bin/$a"; done
}

# stage_root DIR FIO_DIR AGENT_DIR: the guest's root filesystem contents (initramfs and rootfs);
# FIO_DIR empty: without fio.
stage_root() {
    local stage=$1
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,usr/bin,proc,sys,dev,tmp,mnt}
    chmod 1777 "$stage/tmp"
    install -m 0755 "$3/init" "$stage/init"
    [[ -z $2 ]] || install -m 0755 "$2/fio" "$stage/usr/bin/fio"
}

# zero_mtimes DIR: every file's time set to the epoch, so the archive or image is reproducible.
zero_mtimes() { find "$1" -exec touch -h -d @0 {} +; }

# write_cpio DIR OUT.cpio: DIR's files as a reproducible newc archive.
write_cpio() {
    zero_mtimes "$1"
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc --reproducible -R 0:0) >"$2"
}

build_initramfs() { # OUT_DIR FIO_DIR AGENT_DIR: initramfs.cpio, initramfs-fio.cpio, busybox.cpio
    local stage=$WORK/.tmp-initramfs.$$
    # /dev/console comes from the kernel's built-in initramfs (usr/default_cpio_list).
    stage_root "$stage" "" "$3"
    write_cpio "$stage" "$1/initramfs.cpio"
    stage_root "$stage" "$2" "$3"
    write_cpio "$stage" "$1/initramfs-fio.cpio"
    rm -rf "$stage" && mkdir -p "$stage"
    stage_busybox "$stage"
    write_cpio "$stage" "$1/busybox.cpio"
    rm -rf "$stage"
}

# build_rootfs OUT.ext4 FIO_DIR AGENT_DIR: the same contents as an ext4 image, for booting with
# root=/dev/vda and no initramfs (the way CI users boot a prebuilt root filesystem). No device
# nodes: init's console is opened before the root is mounted, and the kernel mounts devtmpfs on
# /dev (DEVTMPFS_MOUNT) itself. No root needed to build it.
build_rootfs() {
    local stage=$WORK/.tmp-rootfs.$$
    stage_root "$stage" "$2" "$3"
    stage_busybox "$stage"
    zero_mtimes "$stage"
    # Fixed UUID, hash seed and time: the same inputs give the same bytes.
    E2FSPROGS_FAKE_TIME=1 run_logged "$LOGS/rootfs.log" mke2fs -q -F -t ext4 -d "$stage" \
        -L guestroot -U 5c0ffee0-0000-4000-8000-000000000001 \
        -E root_owner=0:0,hash_seed=5c0ffee0-0000-4000-8000-000000000002 \
        -b 4096 "$1" 32M
    # mke2fs -d copies each file's ctime, which touch cannot set, and its owner (the builder's
    # uid when not root): pin them to the fake time and root, as the cpio archives have them
    # (the root dir, inode 2, and the copied files, inodes 12 and up; mke2fs's own have them).
    local used i f
    used=$(dumpe2fs -h "$1" 2>/dev/null |
        awk -F: '/^Inode count/ {c = $2} /^Free inodes/ {f = $2} END {print c - f}')
    for i in 2 $(seq 12 "$used"); do
        for f in "ctime @1" "uid 0" "gid 0"; do echo "set_inode_field <$i> $f"; done
    done >"$stage.debugfs"
    E2FSPROGS_FAKE_TIME=1 run_logged "$LOGS/rootfs.log" debugfs -w -f "$stage.debugfs" "$1"
    rm -rf "$stage" "$stage.debugfs"
}

# ensure_artifact NAME KEY BUILDER: $CACHE/NAME-KEY, built by BUILDER into a tmp dir + rename.
ensure_artifact() {
    local dir=$CACHE/$1-$2 tmp=$CACHE/.tmp-$1-$2.$$ t0=$SECONDS
    if [[ -d $dir ]]; then
        log "$1: cached ($dir)"
    else
        rm -rf "$tmp" && mkdir -p "$tmp"
        "$3" "$tmp"
        # Inputs edited while building would be cached under the old key: refuse.
        compute_keys
        [[ ${ARTIFACT_KEYS[$1]:-} == "$2" ]] ||
            die "$1: inputs changed during the build, run build.sh again"
        mv -T "$tmp" "$dir"
        log "$1: built in $((SECONDS - t0)) s"
    fi
}

# ---------------------------------------------------------------------------------------------
compute_keys() {
    shopt -s nullglob
    PATCHES=("$PATCH_DIR"/*.patch)
    shopt -u nullglob
    LINUX_SRC_VER=$(pkg_version linux-source-6.12)
    BUSYBOX_VER=$(pkg_version busybox-static)
    LIBC_VER=$(pkg_version libc6-dev)
    LIBAIO_VER=$(pkg_version libaio-dev)
    GCC_VER=$(gcc -dumpfullversion 2>/dev/null || echo none)
    RUSTC_VER=$(rustc -vV 2>/dev/null | tr '\n' ' ' || echo none)
    PATCHES_KEY=$(cat /dev/null "${PATCHES[@]}" | short_hash)
    KERNEL_KEY=$( {
        echo "kernel $LINUX_SRC_VER $GCC_VER"
        cat "$FRAGMENT" "${PATCHES[@]}"
        declare -f build_kernel verify_kconfig
        declare -p KCONFIG_SELECTED_BY_OTHERS
    } | short_hash)
    FIO_KEY=$( {
        echo "fio $FIO_SRC_VER $GCC_VER $LIBC_VER $LIBAIO_VER"
        declare -f build_fio
    } | short_hash)
    AGENT_KEY=$( {
        echo "agent $RUSTC_VER $LIBC_VER"
        (cd "$AGENT_DIR" && find Cargo.toml Cargo.lock src -type f -print0 | LC_ALL=C sort -z |
            xargs -0 sha256sum)
        declare -f build_agent
    } | short_hash)
    OUT_KEY=$( {
        echo "$KERNEL_KEY $FIO_KEY $AGENT_KEY busybox $BUSYBOX_VER"
        cat "$SELF"
    } | short_hash)
    OUT=$CACHE/$OUT_KEY
    ARTIFACT_KEYS=([kernel]=$KERNEL_KEY [fio]=$FIO_KEY [agent]=$AGENT_KEY)
}

write_versions() {
    cat <<EOF
linux-source-6.12 $LINUX_SRC_VER
patches ${PATCHES[*]##*/}
fio (source package) $FIO_SRC_VER
busybox-static $BUSYBOX_VER
libc6-dev $LIBC_VER
libaio-dev $LIBAIO_VER
gcc $GCC_VER
$(rustc -V)
kernel-key $KERNEL_KEY
fio-key $FIO_KEY
agent-key $AGENT_KEY
EOF
}

main() {
    local print_only=0
    case ${1:-} in
    --print-dir) print_only=1 ;;
    "") ;;
    -h | --help)
        sed -n '2,17p' "$SELF" | sed 's/^# \{0,1\}//' >&2
        exit 0
        ;;
    *) die "unknown argument: $1 (try --help)" ;;
    esac

    if ((print_only)); then
        FIO_SRC_VER=$(fio_source_version)
        compute_keys
        if [[ -d $OUT ]]; then
            echo "$OUT"
            exit 0
        fi
        log "not built yet: $OUT"
        exit 1
    fi

    check_host_packages
    ensure_fio_source_listed
    compute_keys
    if [[ -d $OUT ]]; then
        log "up to date"
        echo "$OUT"
        exit 0
    fi

    mkdir -p "$CACHE" "$WORK" "$LOGS"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "another build.sh holds $CACHE/.lock, waiting"
        flock 9
    fi
    if [[ -d $OUT ]]; then # built by another run meanwhile
        echo "$OUT"
        exit 0
    fi
    # Holding the lock, so any .tmp-* left is from an interrupted run.
    rm -rf "$CACHE"/.tmp-* "$WORK"/.tmp-*
    trap 'rm -rf "$CACHE"/.tmp-*.$$ "$WORK"/.tmp-*.$$' EXIT

    local t0=$SECONDS out=$OUT
    ensure_artifact kernel "$KERNEL_KEY" build_kernel
    ensure_artifact fio "$FIO_KEY" build_fio
    ensure_artifact agent "$AGENT_KEY" build_agent

    local tmp=$CACHE/.tmp-out-$OUT_KEY.$$ k=$CACHE/kernel-$KERNEL_KEY
    mkdir -p "$tmp"
    cp "$k/vmlinux" "$k/bzImage" "$k/kernel.config" "$tmp/"
    build_initramfs "$tmp" "$CACHE/fio-$FIO_KEY" "$CACHE/agent-$AGENT_KEY"
    build_rootfs "$tmp/rootfs.ext4" "$CACHE/fio-$FIO_KEY" "$CACHE/agent-$AGENT_KEY"
    echo "$CMDLINE_PVM" >"$tmp/cmdline-pvm.txt"
    write_versions >"$tmp/versions.txt"
    compute_keys
    [[ $OUT == "$out" ]] || die "inputs changed during the build, run build.sh again"
    mv -T "$tmp" "$OUT"
    log "done in $((SECONDS - t0)) s: initramfs.cpio $(($(stat -c %s "$OUT/initramfs.cpio") / 1024)) KiB, initramfs-fio.cpio $(($(stat -c %s "$OUT/initramfs-fio.cpio") / 1024)) KiB"
    echo "$OUT"
}

main "$@"
