//! The PostgREST subset served at `/rest/v1/<table>`, behind an emulation of the Supabase
//! gateway's API-key checks. Each request runs as one transaction under the request's
//! Postgres role (`SET LOCAL ROLE`), so row level security and grants decide what it sees.

// `ApiError` carries every header an error response needs (about 160 bytes). Errors end a
// request, so their size does not matter for speed.
#![allow(clippy::result_large_err)]

pub mod error;
pub mod faults;
pub mod query;
pub mod schema;
pub mod sql;

mod gateway;
mod handler;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::routing::any;
use axum::Router;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::auth::Keys;
pub use faults::{RequestCounts, RestFault, RestFaults};
use schema::SchemaCache;

/// REST settings.
#[derive(Debug, Clone)]
pub struct RestOptions {
    /// Rows a read returns at most (PostgREST `db-max-rows`; 1000 on Supabase).
    pub max_rows: i64,
    /// Database connections in the pool.
    pub pool_size: usize,
    /// How long a request waits for a pool connection before 504 `PGRST003`.
    pub pool_timeout: Duration,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout: Duration,
}

impl Default for RestOptions {
    fn default() -> Self {
        RestOptions {
            max_rows: 1000,
            pool_size: 16,
            pool_timeout: Duration::from_secs(10),
            idle_timeout: faults::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The REST service: pool, schema cache, keys and fault switches.
#[derive(Clone)]
pub struct Rest {
    state: Arc<RestState>,
}

pub(crate) struct RestState {
    pool: Pool,
    schema: RwLock<Arc<SchemaCache>>,
    keys: Arc<Keys>,
    faults: RestFaults,
    options: RestOptions,
}

impl Rest {
    /// Connects the pool and loads the schema cache.
    pub async fn start(
        database_url: &str,
        keys: Arc<Keys>,
        options: RestOptions,
    ) -> anyhow::Result<Rest> {
        let mut config: tokio_postgres::Config = database_url
            .parse()
            .with_context(|| "invalid database URL".to_string())?;
        // Responses serialise timestamps in the session time zone, which is UTC on Supabase.
        config.options("-c TimeZone=UTC");
        config.application_name("supabase-emulator-rest");
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(options.pool_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .context("failed to build the database pool")?;
        let client = pool
            .get()
            .await
            .context("failed to connect to the database")?;
        let schema = SchemaCache::load(&client)
            .await
            .context("failed to load the schema cache")?;
        drop(client);
        let faults = RestFaults::default();
        faults.set_idle_timeout(options.idle_timeout);
        Ok(Rest {
            state: Arc::new(RestState {
                pool,
                schema: RwLock::new(Arc::new(schema)),
                keys,
                faults,
                options,
            }),
        })
    }

    /// Reloads the schema cache, as PostgREST does on `NOTIFY pgrst, 'reload schema'`.
    pub async fn reload_schema(&self) -> anyhow::Result<()> {
        let client = self.state.pool.get().await?;
        let schema = SchemaCache::load(&client).await?;
        *self.state.schema.write().expect("schema lock") = Arc::new(schema);
        Ok(())
    }

    pub fn faults(&self) -> &RestFaults {
        &self.state.faults
    }

    /// Routes for `/rest/v1`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/rest/v1/{table}", any(handler::handle))
            .route("/rest/v1/", any(handler::handle_root))
            .route("/rest/v1", any(handler::handle_root))
            .with_state(self.state.clone())
    }

    /// Closes the pool's connections.
    pub fn close(&self) {
        self.state.pool.close();
    }
}
