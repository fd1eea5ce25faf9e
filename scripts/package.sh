#!/usr/bin/env bash
# Builds the Debian packages: cutover (the coordinator and the operator CLI)
# and cutover-agent, with dpkg-deb from what the workspace builds.
#
#   scripts/package.sh [--profile release|debug] [--out DIR] [--no-build]
#
# Each package installs its binary in /usr/bin, its unit in
# /lib/systemd/system (ExecStart pointed at /usr/bin), creates its system
# user and the directories the unit and the operator guide expect, with
# their modes: /etc/cutover (root, 0755) and /etc/cutover/pki (the service
# user's, 0700). cutover also ships /etc/cutover/coordinator.toml (a
# conffile, root:cutover 0640), its man pages and shell completions. Neither
# starts its service: the coordinator needs a CA first (`cutover ca init`),
# the agent a join (`cutover-agent join`); docs/operator-guide.md, "Packages".
# A purge removes the config and the service's state dir; the users stay,
# as Debian does.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
out=target/debian
build=1
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=${2:-}; shift 2 ;;
    --out) out=${2:-}; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: $0 [--profile release|debug] [--out DIR] [--no-build]" >&2; exit 2 ;;
  esac
done
# Debug binaries are large and only for tests: compressed fast, not small.
case $profile in
  release) cargo_profile=(--release); bin_dir=target/release; compress=(-Zxz) ;;
  debug) cargo_profile=(); bin_dir=target/debug; compress=(-Zgzip -z1) ;;
  *) echo "--profile must be release or debug, not ${profile:-nothing}" >&2; exit 2 ;;
esac
command -v dpkg-deb >/dev/null || { echo "error: dpkg-deb is missing (Debian package dpkg)" >&2; exit 1; }
if [ "$build" = 1 ]; then
  cargo build --locked "${cargo_profile[@]}" -p cutover-coordinator -p cutover-agent --bins
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# package NAME USER HOME DESCRIPTION [POSTINST]: the common frame of both;
# POSTINST runs once the user and dirs exist.
package() {
  local name=$1 user=$2 home=$3 description=$4 root=$work/$1
  install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/share/doc/$name"
  install -m 0755 "$bin_dir/$name" "$root/usr/bin/$name"
  sed 's|/usr/local/bin/|/usr/bin/|g' "deploy/systemd/$name.service" >"$root/lib/systemd/system/$name.service"
  chmod 0644 "$root/lib/systemd/system/$name.service"
  install -m 0644 LICENSE "$root/usr/share/doc/$name/copyright" 2>/dev/null ||
    printf 'cutover %s, Apache-2.0\n' "$version" >"$root/usr/share/doc/$name/copyright"
  cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: cutover developers <cutover@localhost>
Section: admin
Priority: optional
Depends: adduser, systemd
Description: $description
EOF
  # Creates the service user and the dirs the unit and the guide expect;
  # an existing PKI dir keeps its owner (a CA may be there already).
  cat >"$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
  if ! getent passwd $user >/dev/null; then
    adduser --system --group --home $home --no-create-home --shell /usr/sbin/nologin $user >/dev/null
  fi
  install -d -m 0755 /etc/cutover
  if [ ! -d /etc/cutover/pki ]; then
    install -d -m 0700 -o $user -g $user /etc/cutover/pki
  fi
  ${5:-}
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
  fi
fi
EOF
  cat >"$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "\$1" = remove ]; then
  systemctl stop $name.service >/dev/null 2>&1 || true
  systemctl disable $name.service >/dev/null 2>&1 || true
fi
EOF
  cat >"$root/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = purge ]; then
  rm -rf $home
  # What postinst made, if nothing else is left in it.
  rmdir /etc/cutover/pki /etc/cutover 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null || true
fi
EOF
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
}

package cutover cutover /var/lib/cutover \
  "deployment orchestrator for plain VMs: the coordinator and the operator CLI" \
  "chgrp cutover /etc/cutover/coordinator.toml && chmod 0640 /etc/cutover/coordinator.toml"
root=$work/cutover
install -d "$root/etc/cutover" "$root/usr/share/man/man1" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d"
install -m 0640 deploy/config/coordinator.toml "$root/etc/cutover/coordinator.toml"
echo /etc/cutover/coordinator.toml >"$root/DEBIAN/conffiles"
"$bin_dir/cutover" man --out "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
"$bin_dir/cutover" completion bash >"$root/usr/share/bash-completion/completions/cutover"
"$bin_dir/cutover" completion zsh >"$root/usr/share/zsh/vendor-completions/_cutover"
"$bin_dir/cutover" completion fish >"$root/usr/share/fish/vendor_completions.d/cutover.fish"
install -m 0644 deploy/config/cli.toml "$root/usr/share/doc/cutover/cli.toml.example"

package cutover-agent cutover-agent /var/lib/cutover-agent \
  "deployment orchestrator for plain VMs: the agent of an app node"
install -m 0644 deploy/config/agent.toml "$work/cutover-agent/usr/share/doc/cutover-agent/agent.toml.example"

for name in cutover cutover-agent; do
  find "$work/$name" -type d -exec chmod 0755 {} +
  dpkg-deb --root-owner-group "${compress[@]}" --build "$work/$name" "$out/${name}_${version}_${arch}.deb" >/dev/null
  echo "$out/${name}_${version}_${arch}.deb"
done
