#!/usr/bin/env bash
# Installs the Debian packages some tests need, only those that are missing:
#   chromium    headless browser for the UI check
#   postgresql  server binaries for the production-instance (PostgreSQL storage) test
#
# usage: scripts/install-system-packages.sh [--dry-run] [PACKAGE...]   (default packages: chromium postgresql)
#
# Idempotent: when every package is present it only checks and exits (no apt-get, no network). Runs apt-get as
# root, or through sudo when not root. --dry-run prints the commands it would run instead of running them.
# Exits non-zero with a message saying what to do when it cannot install.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
packages=("$@")
[[ ${#packages[@]} -gt 0 ]] || packages=(chromium postgresql)

# A file that proves a package usable (the tests look for exactly these); other packages: dpkg's word only.
probe_for() {
  case $1 in
    chromium) echo "/usr/bin/chromium" ;;
    postgresql) echo "/usr/lib/postgresql/*/bin/initdb" ;;
    *) echo "" ;;
  esac
}

installed() {
  local package=$1 probe
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || return 1
  [[ -z $(probe_for "$package") ]] && return 0
  # shellcheck disable=SC2046 # the probe may be a glob
  for probe in $(probe_for "$package"); do
    [[ -e $probe ]] && return 0
  done
  return 1
}

fail() {
  echo "install-system-packages: $*" >&2
  echo "install-system-packages: install them by hand: apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
}

run() {  # run a command as root (or print it with --dry-run)
  if [[ $dry_run -eq 1 ]]; then
    echo "would run: ${as_root[*]} $*"
  else
    "${as_root[@]}" "$@"
  fi
}

missing=()
for package in "${packages[@]}"; do
  installed "$package" || missing+=("$package")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-system-packages: ${packages[*]} installed; nothing to do"
  exit 0
fi

command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and there is no apt-get (not Debian/Ubuntu)"
if [[ $(id -u) -eq 0 ]]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  fail "missing ${missing[*]}; not root, and sudo is not installed or asks for a password"
fi

echo "install-system-packages: installing ${missing[*]}"
# Installing a package must not start its service: the tests start their own PostgreSQL on a private port.
policy_rc=/usr/sbin/policy-rc.d
added_policy=0
if [[ ! -e $policy_rc ]]; then
  run sh -c "printf '#!/bin/sh\nexit 101\n' > $policy_rc && chmod 755 $policy_rc"
  added_policy=1
fi
cleanup() {
  if [[ $added_policy -eq 1 ]]; then run rm -f "$policy_rc"; fi
}
trap cleanup EXIT

run env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
  || fail "apt-get update failed (no network, or no package sources configured?)"
run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" \
  || fail "apt-get install ${missing[*]} failed"

[[ $dry_run -eq 1 ]] && exit 0
for package in "${missing[@]}"; do
  installed "$package" || fail "$package is still not usable after installing it"
done
echo "install-system-packages: installed ${missing[*]}"
