#!/usr/bin/env bash
# Run the whole test suite: unit, contract, cross-engine, hostile-input and
# property tests of every crate, then the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# Doc tests first, so that the run closes on the main runner's summary.
cargo test --workspace --doc --quiet
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
