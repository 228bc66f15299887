//! supaworker runs jobs from a Supabase `jobs` table.
//!
//! Layout, one module per runtime role:
//! - [`config`]: environment and the action table, validated before anything connects;
//! - [`actions`]: the action table and payload validation;
//! - [`postgrest`]: the only code that builds REST requests (list, claim, flush, finish);
//! - [`realtime`]: the Phoenix channel client that turns inserts into wake-up hints;
//! - [`dispatch`]: dedupes hints, sweeps, holds the slots and claims;
//! - [`job`]: one claimed job from first log line to final status;
//! - [`runner`]: process groups, output and time-outs (never calls PostgREST);
//! - [`rescue`]: finishes jobs left `running` by a worker that died;
//! - [`shutdown`]: signals and the drain;
//! - [`telemetry`]: logging setup;
//! - [`health`] and [`metrics`]: the probe and Prometheus endpoint;
//! - [`check`]: `supaworker check`, which diagnoses a deployment;
//! - [`worker`]: wires the roles together for `supaworker run`.

pub mod actions;
pub mod check;
pub mod config;
pub mod dispatch;
pub mod health;
pub mod job;
pub mod metrics;
pub mod postgrest;
pub mod realtime;
pub mod rescue;
pub mod runner;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
