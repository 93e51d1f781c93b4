#!/usr/bin/env bash
# Installs the Debian packages the build, the guest image and the tests need (idempotent:
# only missing packages are installed). Needs root or sudo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

pkgs=(acpica-tools device-tree-compiler gnuplot-nox)
while read -r p; do
  [[ -z "$p" || "$p" == \#* ]] || pkgs+=("$p")
done < "$root/resources/guest/host-packages.txt"

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-host: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q >&2
  # Through env: sudo's env_reset (Debian's default sudoers) drops a DEBIAN_FRONTEND set before it.
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi
# The guest recipe builds fio from Debian's source package: apt needs a deb-src entry. Mirror
# debian.sources (Debian 12's deb822 file) with Types: deb-src, once.
if ! apt-cache showsrc fio 2>/dev/null | grep -q '^Version:'; then
  src=/etc/apt/sources.list.d/debian.sources dst=/etc/apt/sources.list.d/deb-src.sources
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  if [[ ! -e $dst ]]; then
    [[ -r $src ]] || { echo "setup-host: cannot add a deb-src entry: $src not found; add one for fio by hand" >&2; exit 1; }
    echo "setup-host: adding $dst (deb-src mirror of $src) for apt-get source fio" >&2
    sed 's/^Types:.*/Types: deb-src/' "$src" | "${sudo_cmd[@]}" tee "$dst" >/dev/null
  fi
  "${sudo_cmd[@]}" apt-get update -q >&2
fi
command -v cargo >/dev/null || { echo "setup-host: cargo (Rust toolchain) is required: install rustup (https://rustup.rs); rust-toolchain.toml picks the channel and components" >&2; exit 1; }
if [[ ! -e /dev/kvm ]]; then
  echo "setup-host: WARNING: /dev/kvm is missing; the VMM and its KVM tests need it (enable virtualization, load kvm_intel/kvm_amd)" >&2
elif [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
  kvm_group=$(stat -c %G /dev/kvm)
  if [[ $kvm_group == root ]] || (( ($(stat -c %a /dev/kvm) / 10 % 10) < 6 )); then
    # Not group-accessible (Debian's udev rule normally makes it root:kvm 0660).
    echo "setup-host: WARNING: $(id -un) cannot open /dev/kvm ($(stat -c '%U:%G %a' /dev/kvm)): make it group kvm, mode 0660 ('sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm'; the udev rule of Debian's systemd does this at boot), then 'sudo usermod -aG kvm $(id -un)' and log in again" >&2
  else
    echo "setup-host: WARNING: $(id -un) cannot open /dev/kvm ($(stat -c '%U:%G %a' /dev/kvm)): 'sudo usermod -aG $kvm_group $(id -un)', then log in again (or 'newgrp $kvm_group')" >&2
  fi
fi
