#!/usr/bin/env bash
# Boot-time benchmark: boots the test guest N rounds (default 3) with our vmm and, in the same
# run, with QEMU (when qemu-system-x86_64 is installed: apt-get install qemu-system-x86) and
# Cloud Hypervisor (when CH_BIN points at a cloud-hypervisor binary), alternating VMMs in each
# round so all see the same host load. Two configurations (CONFIGS, default "bare iommu"):
#   bare   1 guest, no IOMMU, no disk
#   iommu  vmm: --iommu --disk (virtio-iommu + interrupt remapping, the disk behind it);
#          QEMU: virtio-iommu-pci + virtio-blk-pci (iommu_platform=on); CH: --disk ...,iommu=on
# Prints, per configuration and VMM, the time from VMM start to the guest's GUEST_INIT_REACHED
# line (measured the same way for every VMM, from the host), to exit, the medians, and the
# ratios to QEMU and CH. For vmm also the VMM's own figures from --stats-json: boot_to_init_ms
# (VMM start -> the guest's init mark), first_kvm_run_ms, RSS without guest RAM, threads.
# VMM_BASE_BIN=path adds a row for another vmm build (e.g. before a change), same arguments.
# NO_QEMU=1 leaves QEMU out (e.g. for a vmm / Cloud Hypervisor comparison only).
# LOGS=DIR keeps every console as DIR/<vmm>-<config>-<round>.log with host arrival times;
# scripts/boot-timeline.py DIR/vmm-iommu-1.log DIR/ch-iommu-1.log shows where they differ.
# Timings on a PVM host are only meaningful as ratios within one run.
#   scripts/bench-boot.sh [N] [CPUS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
n="${1:-3}"
cpus="${2:-1}"
configs="${CONFIGS:-bare iommu}"
if [[ -n "${LOGS:-}" ]]; then mkdir -p "$LOGS"; LOGS="$(cd "$LOGS" && pwd)"; fi
guest="$(bash resources/guest/build.sh | tail -n1)"
cargo build --release --bin vmm >&2
vmm_bin="${VMM_BIN:-$root/target/release/vmm}"
cmdline="console=ttyS0 panic=-1 guest.checks=cpus"
[[ -e /sys/module/kvm_pvm ]] && cmdline+=" $(cat "$guest/cmdline-pvm.txt")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
disk="$work/disk.img"
truncate -s 64M "$disk"

# now_ms: milliseconds since the epoch, without a fork (bash 5's EPOCHREALTIME).
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }

# measure LOG CMD...: prints "<ms to GUEST_INIT_REACHED> <ms to exit>", host-side; with LOG
# non-empty, also writes the console there, each line prefixed by its host arrival time in ms
# since the VMM's start (scripts/boot-timeline.py --host reads that).
measure() {
  local log=$1 start init="" now
  shift
  start=$(now_ms)
  while IFS= read -r line; do
    now=$(now_ms)
    [[ -n "$log" ]] && printf '%s %s\n' "$((now - start))" "$line" >>"$log"
    if [[ -z "$init" && "$line" == *GUEST_INIT_REACHED* ]]; then
      init=$((now - start))
    fi
  done < <(timeout 900 "$@" 2>&1 </dev/null)
  local total=$(($(now_ms) - start))
  printf '%s %s\n' "${init:-NaN}" "$total"
}

# cmd_for VMM CONFIG: fills the array `cmd`.
cmd_for() {
  local vmm=$1 cfg=$2
  case $vmm in
    vmm|vmm-base)
      local bin=$vmm_bin
      if [[ $vmm == vmm-base ]]; then bin=$VMM_BASE_BIN; fi
      cmd=("$bin" --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio" --cpus "$cpus"
        --memory 256 --cmdline "$cmdline" --stats-json "$work/$vmm-$cfg.json")
      if [[ $cfg == iommu ]]; then cmd+=(--iommu --disk "$disk"); fi
      ;;
    qemu)
      # q35 with an Intel vendor: QEMU's qemu64 model is AMD without XSAVEERPTR, which makes
      # this guest take an FPU path the PVM emulator cannot run (resources/guest/README.md).
      # shellcheck disable=SC2054 # the commas are QEMU's option syntax
      cmd=(qemu-system-x86_64 -enable-kvm -M q35 -cpu qemu64,vendor=GenuineIntel,+x2apic,-cx16
        -m 256 -smp "$cpus" -nodefaults -vga none -display none -serial stdio -monitor none
        -no-reboot -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio" -append "$cmdline")
      if [[ $cfg == iommu ]]; then
        # shellcheck disable=SC2054
        cmd+=(-device virtio-iommu-pci -drive "file=$disk,if=none,id=d0,format=raw,cache=none"
          -device virtio-blk-pci,drive=d0,iommu_platform=on,disable-legacy=on)
      fi
      ;;
    ch)
      cmd=("$CH_BIN" --kernel "$guest/vmlinux" --initramfs "$guest/initramfs.cpio"
        --cmdline "$cmdline" --cpus "boot=$cpus" --memory size=256M --serial tty --console off)
      if [[ $cfg == iommu ]]; then cmd+=(--disk "path=$disk,iommu=on"); fi
      ;;
  esac
}

vmms=(vmm)
[[ -n "${VMM_BASE_BIN:-}" ]] && vmms+=(vmm-base)
command -v qemu-system-x86_64 >/dev/null && [[ ${NO_QEMU:-0} != 1 ]] && vmms+=(qemu)
[[ -n "${CH_BIN:-}" ]] && vmms+=(ch)

declare -A init_ms exit_ms own
for ((i = 1; i <= n; i++)); do
  for cfg in $configs; do
    for v in "${vmms[@]}"; do
      cmd_for "$v" "$cfg"
      log=""
      if [[ -n "${LOGS:-}" ]]; then log="$LOGS/$v-$cfg-$i.log"; : >"$log"; fi
      read -r a b < <(measure "$log" "${cmd[@]}")
      init_ms[$v.$cfg]+="$a "
      exit_ms[$v.$cfg]+="$b "
      if [[ $v == vmm* && -s "$work/$v-$cfg.json" ]]; then
        own[$v.$cfg]+="$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); o=j.get("overhead") or {}
print("{},{},{},{},{}".format(j.get("boot_to_init_ms"), o.get("first_kvm_run_ms"), o.get("rss_mid_boot_kib"), o.get("rss_exit_kib"), o.get("threads")))' "$work/$v-$cfg.json") "
      fi
      echo "round $i $cfg $v: init ${a} ms, exit ${b} ms" >&2
    done
  done
done

median() {
  printf '%s\n' "$@" | grep -v NaN | sort -n |
    awk '{a[NR]=$1} END {if (!NR) print "NaN"; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}
ratio() {
  if [[ $1 == NaN || $2 == NaN ]]; then echo n/a; else echo "$1 $2" | awk '{printf "%.2f", $1 / $2}'; fi
}
echo
echo "| config | VMM | vCPUs | runs | init (ms) each | median init (s) | median exit (s) | init / qemu | init / ch |"
echo "|---|---|---|---|---|---|---|---|---|"
# shellcheck disable=SC2086 # the samples are space-separated words on purpose
for cfg in $configs; do
  q=NaN; c=NaN
  [[ -n "${init_ms[qemu.$cfg]:-}" ]] && q=$(median ${init_ms[qemu.$cfg]})
  [[ -n "${init_ms[ch.$cfg]:-}" ]] && c=$(median ${init_ms[ch.$cfg]})
  for v in "${vmms[@]}"; do
    mi=$(median ${init_ms[$v.$cfg]}); me=$(median ${exit_ms[$v.$cfg]})
    printf '| %s | %s | %s | %s | %s| %s | %s | %s | %s |\n' "$cfg" "$v" "$cpus" "$n" \
      "${init_ms[$v.$cfg]}" "$(ratio "$mi" 1000)" "$(ratio "$me" 1000)" "$(ratio "$mi" "$q")" "$(ratio "$mi" "$c")"
  done
done
if ((${#own[@]})); then
  echo
  echo "VMM-measured (--stats-json), each run: boot_to_init_ms,first_kvm_run_ms,rss_mid_boot_kib,rss_exit_kib,threads"
  for k in "${!own[@]}"; do echo "  $k: ${own[$k]}"; done
fi
