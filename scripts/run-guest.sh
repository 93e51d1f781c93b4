#!/usr/bin/env bash
# The main job: set up what is missing, build the VMM (release) and the test guest (cached
# under ~/.cache/vmm-guest), then boot the default guest with --iommu and 2 vCPUs.
# Extra arguments go to vmm (e.g. --stats, -v). GUEST_CHECKS selects the guest agent's checks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

bash scripts/setup-host.sh
guest="$(bash resources/guest/build.sh | tail -n1)"
cargo build --release --bin vmm >&2

cmdline="console=ttyS0 panic=-1 guest.checks=${GUEST_CHECKS:-cpus,serial-irq,iommu-groups}"
# On a PVM host (KVM without VMX/SVM) the guest kernel needs emul_quirks and clearcpuid=...;
# see shared/design/host-pvm.md. On a real KVM host nothing is added.
if [[ -e /sys/module/kvm_pvm ]]; then
  cmdline+=" $(cat "$guest/cmdline-pvm.txt")"
fi
exec "$root/target/release/vmm" --kernel "$guest/vmlinux" --initrd "$guest/initramfs.cpio" \
  --cpus 2 --memory 512 --iommu --cmdline "$cmdline" "$@"
