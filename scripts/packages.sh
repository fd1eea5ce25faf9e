# shellcheck shell=bash
# Sourced by test.sh and demo.sh: installs a Debian package where a command
# is missing, as root (apt-get update once, first), or says what to install.
need_package() { # COMMAND PACKAGE [apt-get flags]
  local command=$1 package=$2
  shift 2
  command -v "$command" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $command is missing (Debian package $package); install it, or run this as root on Debian" >&2
    exit 1
  fi
  echo "installing $package (for $command)"
  if [ -z "${apt_updated:-}" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" "$package" >/dev/null
  command -v "$command" >/dev/null 2>&1 || { echo "error: installing $package gave no $command" >&2; exit 1; }
}
