#!/usr/bin/env bash
# The test command: every test of the workspace, against throwaway PostgreSQL clusters and
# in-process emulators. Uses cargo-nextest when it is installed (one process per test),
# else cargo test. The soak test is ignored here; see the README to run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  exec cargo test --workspace --locked --no-fail-fast "$@"
fi
