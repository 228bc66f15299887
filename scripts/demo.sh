#!/usr/bin/env bash
# Runs supaworker against the local Supabase stack (a throwaway PostgreSQL plus the
# emulator), inserts one job of each lead-pipeline action, and prints every status change
# and the final log of each job. No Supabase account is needed.
#
# Usage: scripts/demo.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
work="$(mktemp -d)"
emulator_pid=""
worker_pid=""
drain_pid=""

cleanup() {
  [[ -n "$worker_pid" ]] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
  [[ -n "$emulator_pid" ]] && kill -TERM "$emulator_pid" 2>/dev/null && wait "$emulator_pid" 2>/dev/null || true
  [[ -n "$drain_pid" ]] && kill "$drain_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> building supaworker and supabase-emulator"
cargo build --quiet --bins
# Honour CARGO_TARGET_DIR and build.target-dir settings.
target_dir="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/debug"

echo "==> starting the local Supabase stack"
mkfifo "$work/emulator.out"
"$bin/supabase-emulator" --port 0 >"$work/emulator.out" 2>"$work/emulator.log" &
emulator_pid=$!
exec 3<"$work/emulator.out"
ready=""
while IFS= read -r line <&3; do
  if [[ "$line" == "ready" ]]; then
    ready=yes
    break
  fi
  case "$line" in
    *=*) export "${line?}" ;;
  esac
done
if [[ -z "$ready" ]]; then
  echo "supabase-emulator did not start; its log:" >&2
  cat "$work/emulator.log" >&2
  exit 1
fi
# Keep draining the emulator's stdout so it never blocks on a full pipe.
cat <&3 >/dev/null &
drain_pid=$!
exec 3<&-
echo "    SUPABASE_URL=$SUPABASE_URL"

export SUPAWORKER_SCRIPTS_DIR="$repo/examples/lead-pipeline"
export SUPAWORKER_INSTANCE_ID="demo-worker"
export SUPAWORKER_LOG_FORMAT=text
export SUPAWORKER_LOG_FLUSH_INTERVAL=1s
unset SUPABASE_SECRET_KEY TWILIO_ACCOUNT_SID TWILIO_AUTH_TOKEN TWILIO_FROM

echo "==> starting the worker (its log: $work/worker.log)"
"$bin/supaworker" run 2>"$work/worker.log" &
worker_pid=$!
sleep 1

echo "==> inserting one job of each action"
"$bin/supaworker" enqueue build_sms_list --payload '{"include_unknown_phone_type": true}' >/dev/null
"$bin/supaworker" enqueue parse_quality_leads >/dev/null
"$bin/supaworker" enqueue run_cbc --payload '{"addresses_csv_name": "propwire_addresses.csv"}' >/dev/null
"$bin/supaworker" enqueue send_campaign_dry_run \
  --payload '{"company_name": "Acme Homes", "message_template": "Hi from {company}!", "sms_delay_sec": 0.5}' >/dev/null
"$bin/supaworker" enqueue send_campaign \
  --payload '{"company_name": "Acme Homes", "message_template": "Hi from {company}!"}' >/dev/null

echo "==> watching the jobs table (status changes as the admin page would see them)"
declare -A seen=()
deadline=$((SECONDS + 60))
while ((SECONDS < deadline)); do
  done_count=0
  while IFS='|' read -r id action status; do
    [[ -z "$id" ]] && continue
    if [[ "${seen[$id]:-}" != "$status" ]]; then
      printf '    job %-3s %-22s %s\n' "$id" "$action" "$status"
      seen[$id]="$status"
    fi
    [[ "$status" == "success" || "$status" == "failed" ]] && done_count=$((done_count + 1))
  done < <(psql "$DATABASE_URL" -XAtq -c "select id, action, status from jobs order by id")
  ((done_count == 5)) && break
  sleep 0.2
done

echo "==> final rows"
psql "$DATABASE_URL" -Xq -c "select id, action, status, finished_at - started_at as ran_for, error from jobs order by id"
echo "==> the log of each job"
psql "$DATABASE_URL" -XAtq -c "select format(E'--- job %s (%s) ---\n%s', id, action, log) from jobs order by id"
