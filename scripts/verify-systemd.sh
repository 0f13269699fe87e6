#!/usr/bin/env bash
# Checks config/systemd/ehrgate.service with `systemd-analyze verify`: the unit parses,
# every directive is known, and its commands exist (the built binary stands in for
# /usr/local/bin/ehrgate). Installs Debian's systemd if systemd-analyze is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends systemd
fi
cargo build --locked -q
bin=$PWD/target/debug/ehrgate
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s|/usr/local/bin/ehrgate|$bin|g" config/systemd/ehrgate.service > "$dir/ehrgate.service"
out=$(systemd-analyze verify --man=no "$dir/ehrgate.service" 2>&1) || { echo "$out" >&2; exit 1; }
# verify exits 0 on some warnings: any line naming the unit is a finding.
if grep -q "ehrgate.service" <<< "$out"; then echo "$out" >&2; exit 1; fi
for key in Type=notify ExecReload= User=ehrgate NoNewPrivileges=yes ProtectSystem=strict \
    PrivateTmp=yes CapabilityBoundingSet=CAP_NET_BIND_SERVICE LimitNOFILE= StateDirectory=ehrgate; do
  grep -q "^$key" config/systemd/ehrgate.service || { echo "ehrgate.service lacks $key" >&2; exit 1; }
done
echo "systemd unit verified: 1 passed, 0 failed"
