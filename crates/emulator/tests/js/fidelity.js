// Runs the official supabase-js client against a running emulator and exits non-zero on
// the first failed check. Reads SUPABASE_URL, SUPABASE_ANON_KEY and
// SUPABASE_SERVICE_ROLE_KEY from the environment.
//
// Checks, in order: a postgres_changes INSERT subscription on `jobs` receives a row
// inserted through the same client's PostgREST API. A conditional update that matches no
// row returns an empty result. An anon client cannot update a job.

'use strict';

const { createClient } = require('@supabase/supabase-js');
const WebSocket = require('ws');

const HANG_GUARD_MS = 30000;

function requireEnv(name) {
  const value = process.env[name];
  if (!value) {
    fail(`environment variable ${name} is missing`);
  }
  return value;
}

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) {
    fail(message);
  }
}

function withHangGuard(promise, what) {
  let timer;
  const guard = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), HANG_GUARD_MS);
  });
  return Promise.race([promise, guard]).finally(() => clearTimeout(timer));
}

function makeClient(url, key) {
  return createClient(url, key, {
    // Node 20 has no global WebSocket, so realtime-js needs the `ws` package.
    realtime: { transport: WebSocket },
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
  });
}

async function subscribeToInserts(client, onInsert) {
  let resolveReady;
  let rejectReady;
  const ready = new Promise((resolve, reject) => {
    resolveReady = resolve;
    rejectReady = reject;
  });
  const channel = client
    .channel('jobs-inserts')
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'jobs' }, onInsert)
    .on('system', {}, (message) => {
      if (message.extension !== 'postgres_changes') {
        return;
      }
      if (message.status === 'ok') {
        resolveReady();
      } else {
        rejectReady(new Error(`postgres_changes error: ${message.message}`));
      }
    })
    .subscribe((status, error) => {
      if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT' || status === 'CLOSED') {
        rejectReady(new Error(`channel status ${status}: ${error ? error.message : ''}`));
      }
    });
  await withHangGuard(ready, 'Subscribed to PostgreSQL');
  return channel;
}

async function main() {
  const url = requireEnv('SUPABASE_URL');
  const anonKey = requireEnv('SUPABASE_ANON_KEY');
  const serviceKey = requireEnv('SUPABASE_SERVICE_ROLE_KEY');
  const service = makeClient(url, serviceKey);
  const anon = makeClient(url, anonKey);

  const inserts = [];
  let notify = () => {};
  await subscribeToInserts(service, (payload) => {
    inserts.push(payload);
    notify();
  });
  console.log('subscribed to INSERTs on public.jobs');

  const action = `js-fidelity-${process.pid}`;
  const inserted = await service
    .from('jobs')
    .insert({ action, payload: { source: 'supabase-js' } })
    .select()
    .single();
  check(!inserted.error, `insert failed: ${JSON.stringify(inserted.error)}`);
  const id = inserted.data.id;
  check(Number.isInteger(id), `insert returned no integer id: ${JSON.stringify(inserted.data)}`);

  const findEvent = () => inserts.find((p) => p.new && p.new.id === id);
  await withHangGuard(
    new Promise((resolve) => {
      notify = () => findEvent() && resolve();
      notify();
    }),
    `the INSERT event of job ${id}`,
  );
  const event = findEvent();
  check(event.eventType === 'INSERT', `eventType is ${event.eventType}`);
  check(event.schema === 'public' && event.table === 'jobs', 'event names another table');
  check(event.new.action === action, `event action is ${event.new.action}`);
  check(event.new.payload.source === 'supabase-js', 'event payload is not nested JSON');
  check(event.new.status === 'pending', `event status is ${event.new.status}`);
  check(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/.test(event.commit_timestamp),
    `commit_timestamp is ${event.commit_timestamp}`);
  check(event.errors === null, `event errors: ${JSON.stringify(event.errors)}`);
  console.log(`received the INSERT event of job ${id}`);

  const noMatch = await service
    .from('jobs')
    .update({ status: 'running' })
    .eq('id', id)
    .eq('status', 'no-such-status')
    .select();
  check(!noMatch.error, `conditional update failed: ${JSON.stringify(noMatch.error)}`);
  check(Array.isArray(noMatch.data) && noMatch.data.length === 0,
    `conditional update matched rows: ${JSON.stringify(noMatch.data)}`);
  console.log('a conditional update that matches nothing returned []');

  const anonUpdate = await anon.from('jobs').update({ status: 'failed' }).eq('id', id).select();
  const anonChanged = !anonUpdate.error && anonUpdate.data && anonUpdate.data.length > 0;
  check(!anonChanged, `anon updated job ${id}: ${JSON.stringify(anonUpdate.data)}`);
  const after = await service.from('jobs').select('status').eq('id', id).single();
  check(!after.error, `read back failed: ${JSON.stringify(after.error)}`);
  check(after.data.status === 'pending', `job status changed to ${after.data.status}`);
  console.log('the anon client could not update the job');

  await service.removeAllChannels();
  await anon.removeAllChannels();
  console.log('OK');
  process.exit(0);
}

main().catch((error) => fail(error && error.stack ? error.stack : String(error)));
