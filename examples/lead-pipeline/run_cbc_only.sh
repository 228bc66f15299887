#!/usr/bin/env bash
# Demo stand-in for the CBC run: takes the addresses CSV name and prints progress.
set -euo pipefail
csv="${1:?usage: run_cbc_only.sh ADDRESSES_CSV}"
echo "running CBC on ${csv}"
for batch in 1 2 3 4; do
  sleep 0.8
  echo "batch ${batch}/4 done"
done
echo "CBC finished"
