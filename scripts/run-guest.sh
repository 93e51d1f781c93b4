#!/usr/bin/env bash
# The main job: set up what is missing, build the VMM (release) and the test guest (cached
# under ~/.cache/vmm-guest), then boot the default guest with --iommu, 2 vCPUs and a scratch
# disk behind the virtio-iommu; the guest runs its checks and powers off.
# Extra arguments go to vmm (e.g. --stats, -v). GUEST_CHECKS selects the guest agent's checks.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

bash scripts/setup-host.sh
guest="$(bash resources/guest/build.sh | tail -n1)"
cargo build --release --bin vmm >&2

# A scratch disk behind the virtio-iommu (sparse, 64 MiB, reused between runs).
disk="${XDG_CACHE_HOME:-$HOME/.cache}/vmm-guest/scratch-disk.img"
[[ -e "$disk" ]] || truncate -s 64M "$disk"

cmdline="console=ttyS0 panic=-1 guest.checks=${GUEST_CHECKS:-cpus,serial-irq,iommu-groups,disk}"
# On a PVM host (KVM without VMX/SVM) the guest kernel needs emul_quirks and clearcpuid=...;
# see "The PVM host" in resources/guest/README.md. On a real KVM host nothing is added.
if [[ -e /sys/module/kvm_pvm ]]; then
  cmdline+=" $(cat "$guest/cmdline-pvm.txt")"
fi
# The fio check needs the initramfs with fio; the others boot faster without it.
initrd="$guest/initramfs.cpio"
[[ ,${GUEST_CHECKS:-}, == *,fio,* ]] && initrd="$guest/initramfs-fio.cpio"
exec "$root/target/release/vmm" --kernel "$guest/vmlinux" --initrd "$initrd" \
  --cpus 2 --memory 512 --iommu --disk "$disk" --cmdline "$cmdline" "$@"
