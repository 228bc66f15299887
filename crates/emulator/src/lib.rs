//! A local stand-in for the parts of Supabase that supaworker uses: PostgREST at `/rest/v1`
//! and Realtime `postgres_changes` at `/realtime/v1/websocket`, over a real PostgreSQL, with
//! fault injection for tests.

pub mod auth;
pub mod pg;
pub mod realtime;
pub mod rest;
