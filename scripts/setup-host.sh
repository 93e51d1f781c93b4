#!/usr/bin/env bash
# Installs the Debian packages the build, the guest image and the tests need (idempotent:
# only missing packages are installed). Needs root or sudo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

pkgs=(acpica-tools device-tree-compiler)
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
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { echo "setup-host: cargo (Rust toolchain) is required" >&2; exit 1; }
[[ -e /dev/kvm ]] || echo "setup-host: WARNING: /dev/kvm is missing; the VMM and its KVM tests need it" >&2
