//! A local stand-in for the parts of Supabase that supaworker uses: PostgREST at `/rest/v1`
//! and Realtime `postgres_changes` at `/realtime/v1/websocket`, over a real PostgreSQL, with
//! fault injection for tests. [`Emulator`] owns the database, both services, the main HTTP
//! port and the control port.

pub mod auth;
mod control;
pub mod pg;
pub mod realtime;
pub mod rest;
pub mod server;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use pg::TestDatabase;
use realtime::Realtime;
use rest::{Rest, RestFaults, RestOptions};
use server::HttpServer;

/// The JWT secret of the Supabase CLI's local stack, used when none is given.
pub const DEFAULT_JWT_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Main port on 127.0.0.1 for REST and Realtime; 0 picks a free port.
    pub port: u16,
    /// Control port on 127.0.0.1; 0 picks a free port.
    pub control_port: u16,
    /// Existing database to serve (schema already loaded); `None` creates a throwaway
    /// [`TestDatabase`].
    pub database_url: Option<String>,
    /// HS256 secret that signs the legacy keys and validates JWTs.
    pub jwt_secret: String,
    /// When false, the legacy `anon`/`service_role` JWT keys get 401 at the gateway.
    pub legacy_keys_enabled: bool,
    pub realtime: realtime::RealtimeOptions,
    pub rest: RestOptions,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            port: 0,
            control_port: 0,
            database_url: None,
            jwt_secret: DEFAULT_JWT_SECRET.to_string(),
            legacy_keys_enabled: true,
            realtime: realtime::RealtimeOptions::default(),
            rest: RestOptions::default(),
        }
    }
}

/// A running emulator. [`Emulator::shutdown`] stops it; dropping it without shutdown stops
/// the listeners' tasks with the runtime and still removes a throwaway database.
pub struct Emulator {
    main: HttpServer,
    control: HttpServer,
    rest: Rest,
    realtime: Realtime,
    keys: Arc<auth::Keys>,
    database_url: String,
    database: Option<TestDatabase>,
}

impl Emulator {
    /// Starts the database (unless given), REST, Realtime, the main port and the control port.
    pub async fn start(opts: EmulatorOptions) -> anyhow::Result<Emulator> {
        let (database, database_url) = match &opts.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let database = TestDatabase::start().await?;
                let url = database.url().to_string();
                (Some(database), url)
            }
        };
        let mut keys = auth::Keys::new(&opts.jwt_secret);
        keys.legacy_enabled = opts.legacy_keys_enabled;
        let keys = Arc::new(keys);

        let rest = Rest::start(&database_url, keys.clone(), opts.rest.clone()).await?;
        let realtime = Realtime::start(&database_url, keys.clone(), opts.realtime.clone())
            .await
            .context("failed to start Realtime")?;

        let router = rest.router().merge(realtime.router());
        let faults = rest.faults().clone();
        let idle_timeout: server::IdleTimeout = Arc::new(move || faults.idle_timeout());
        let main = HttpServer::start(loopback(opts.port), router, idle_timeout).await?;

        let control_router = control::router(control::ControlState {
            rest: rest.clone(),
            main: main.clone(),
            realtime: realtime.clone(),
        });
        let control_idle: server::IdleTimeout = Arc::new(|| Duration::from_secs(60));
        let control =
            HttpServer::start(loopback(opts.control_port), control_router, control_idle).await?;
        tracing::info!(url = %format!("http://{}", main.addr()), control = %format!("http://{}", control.addr()), "emulator started");
        Ok(Emulator {
            main,
            control,
            rest,
            realtime,
            keys,
            database_url,
            database,
        })
    }

    /// `http://127.0.0.1:PORT`, the `SUPABASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.main.addr())
    }

    pub fn keys(&self) -> &auth::Keys {
        &self.keys
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// `http://127.0.0.1:PORT` of the control endpoint.
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control.addr())
    }

    pub fn rest_faults(&self) -> &RestFaults {
        self.rest.faults()
    }

    pub fn realtime(&self) -> &Realtime {
        &self.realtime
    }

    /// Reloads the REST schema cache after DDL.
    pub async fn reload_schema(&self) -> anyhow::Result<()> {
        self.rest.reload_schema().await
    }

    /// Closes the main listener so new connections are refused, and returns once it is
    /// listening again on the same port after `duration`. Open connections stay up.
    pub async fn refuse_connections(&self, duration: Duration) {
        take_down(&self.main, None).await;
        tokio::time::sleep(duration).await;
        self.reopen().await;
    }

    /// Cuts every HTTP and websocket connection without a response or close frame, closes
    /// the listener, and returns once it is listening again on the same port after
    /// `down_for`. The database keeps its data.
    pub async fn restart(&self, down_for: Duration) {
        take_down(&self.main, Some(&self.realtime)).await;
        tokio::time::sleep(down_for).await;
        self.reopen().await;
    }

    async fn reopen(&self) {
        if let Err(error) = self.main.open().await {
            tracing::error!(error = %format!("{error:#}"), "failed to reopen the main listener");
        }
    }

    /// Stops both ports, Realtime and the pool, then removes a throwaway database.
    pub async fn shutdown(self) {
        self.control.stop().await;
        take_down(&self.main, Some(&self.realtime)).await;
        self.realtime.shutdown().await;
        self.rest.close();
        if let Some(database) = self.database {
            let _ = tokio::task::spawn_blocking(move || drop(database)).await;
        }
        tracing::info!("emulator stopped");
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Closes the main listener and, when `realtime` is given, cuts every open HTTP and
/// websocket connection abruptly.
pub(crate) async fn take_down(main: &HttpServer, realtime: Option<&Realtime>) {
    main.close_listener().await;
    if let Some(realtime) = realtime {
        main.drop_connections();
        realtime.drop_all_sockets(None);
    }
}
