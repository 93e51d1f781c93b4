#!/usr/bin/env bash
# Boot-time benchmark: boots the test guest N times (default 3) with our vmm and, if
# qemu-system-x86_64 is installed (apt-get install qemu-system-x86), with QEMU on the same
# kernel, initramfs and command line, alternating so both see the same host load. Prints
# the time from VMM start to the guest's GUEST_INIT_REACHED marker and to power-off, and the
# medians. Timings on a PVM host are only meaningful as ratios within one run.
#   scripts/bench-boot.sh [N] [CPUS]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
n="${1:-3}"
cpus="${2:-1}"
guest="$(bash resources/guest/build.sh | tail -n1)"
cargo build --release --bin vmm >&2
cmdline="console=ttyS0 panic=-1 guest.checks=cpus"
[[ -e /sys/module/kvm_pvm ]] && cmdline+=" $(cat "$guest/cmdline-pvm.txt")"

# Runs a command, prints "<seconds to GUEST_INIT_REACHED> <seconds to exit>".
measure() {
  local start init=""
  start=$(date +%s%N)
  while IFS= read -r line; do
    if [[ -z "$init" && "$line" == *GUEST_INIT_REACHED* ]]; then
      init=$(( ($(date +%s%N) - start) / 1000000 ))
    fi
  done < <(timeout 900 "$@" 2>&1 </dev/null)
  local total=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s %s\n' "${init:-NaN}" "$total"
}

vmm_cmd=("$root/target/release/vmm" --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio"
  --cpus "$cpus" --memory 256 --cmdline "$cmdline")
qemu_cmd=()
if command -v qemu-system-x86_64 >/dev/null; then
  # As in shared/design/host-pvm.md: q35, Intel vendor (QEMU's qemu64 model is AMD without
  # XSAVEERPTR otherwise), PVH boot of the same vmlinux.
  qemu_cmd=(qemu-system-x86_64 -enable-kvm -M q35 -cpu qemu64,vendor=GenuineIntel,+x2apic,-cx16
    -m 256 -smp "$cpus" -nodefaults -vga none -display none -serial stdio -monitor none -no-reboot
    -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio" -append "$cmdline")
fi

declare -a vi vt qi qt
for ((i = 1; i <= n; i++)); do
  read -r a b < <(measure "${vmm_cmd[@]}"); vi+=("$a"); vt+=("$b")
  echo "run $i vmm:  init ${a} ms, exit ${b} ms" >&2
  if ((${#qemu_cmd[@]})); then
    read -r a b < <(measure "${qemu_cmd[@]}"); qi+=("$a"); qt+=("$b")
    echo "run $i qemu: init ${a} ms, exit ${b} ms" >&2
  fi
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '\n| VMM | vCPUs | runs | init (ms) each | median init (s) | median exit (s) |\n|---|---|---|---|---|---|\n'
printf '| vmm | %s | %s | %s | %.1f | %.1f |\n' "$cpus" "$n" "${vi[*]}" \
  "$(echo "$(median "${vi[@]}") / 1000" | bc -l)" "$(echo "$(median "${vt[@]}") / 1000" | bc -l)"
if ((${#qi[@]})); then
  printf '| qemu | %s | %s | %s | %.1f | %.1f |\n' "$cpus" "$n" "${qi[*]}" \
    "$(echo "$(median "${qi[@]}") / 1000" | bc -l)" "$(echo "$(median "${qt[@]}") / 1000" | bc -l)"
  printf '\nratio vmm/qemu (median init): %.2f\n' "$(echo "$(median "${vi[@]}") / $(median "${qi[@]}")" | bc -l)"
fi
