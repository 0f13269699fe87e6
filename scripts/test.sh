#!/usr/bin/env bash
# The tests: installs what they need beyond cargo (idempotent), then runs them all,
# the real-browser test of the clinician's flow included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo test --locked
