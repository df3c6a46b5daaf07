#!/usr/bin/env bash
# Set up and run `atls demo` on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --build-only
# The first run compiles the workspace (a few minutes on two cores).
exec cargo run --quiet --release -p atls-cli -- demo "$@"
