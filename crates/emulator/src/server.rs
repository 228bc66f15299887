//! The HTTP listener with per-connection control: each accepted connection runs in its own
//! task that can be cut abruptly (restart, dropped-response fault) or closed once it has
//! been idle for the keep-alive timeout, and the listener can be closed and reopened on the
//! same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Request extension that lets a handler cut its own connection without a response.
#[derive(Clone)]
pub struct ConnectionControl {
    cancel: CancellationToken,
}

impl ConnectionControl {
    /// Closes the connection this request arrived on; the response is never written.
    pub fn drop_connection(&self) {
        self.cancel.cancel();
    }
}

/// Returns the idle keep-alive timeout to apply now.
pub type IdleTimeout = Arc<dyn Fn() -> Duration + Send + Sync>;

/// A listener on a fixed address serving an axum router.
#[derive(Clone)]
pub struct HttpServer {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    router: Router,
    idle_timeout: IdleTimeout,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    connections: Mutex<HashMap<u64, CancellationToken>>,
    next_id: AtomicU64,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    pub async fn start(
        addr: SocketAddr,
        router: Router,
        idle_timeout: IdleTimeout,
    ) -> anyhow::Result<HttpServer> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to bind {addr}"))?;
        let addr = listener.local_addr()?;
        let server = HttpServer {
            inner: Arc::new(Inner {
                addr,
                router,
                idle_timeout,
                accept_task: Mutex::new(None),
                connections: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        };
        server.spawn_accept(listener);
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Closes the listener: new connections are refused until [`HttpServer::open`].
    /// Open connections stay up.
    pub async fn close_listener(&self) {
        let task = self.inner.accept_task.lock().expect("server lock").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Binds the same address again and resumes accepting. Retries for a while because the
    /// port can be briefly unavailable after close.
    pub async fn open(&self) -> anyhow::Result<()> {
        if self
            .inner
            .accept_task
            .lock()
            .expect("server lock")
            .is_some()
        {
            return Ok(());
        }
        let mut attempt = 0;
        let listener = loop {
            match TcpListener::bind(self.inner.addr).await {
                Ok(listener) => break listener,
                Err(error) if attempt < 100 => {
                    attempt += 1;
                    tracing::debug!(%error, addr = %self.inner.addr, "rebind failed, retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("failed to rebind {}", self.inner.addr))
                }
            }
        };
        self.spawn_accept(listener);
        Ok(())
    }

    /// Cuts every open connection without a response or close handshake.
    pub fn drop_connections(&self) {
        let connections = std::mem::take(&mut *self.inner.connections.lock().expect("server lock"));
        for token in connections.values() {
            token.cancel();
        }
    }

    /// Closes the listener and cuts every connection.
    pub async fn stop(&self) {
        self.close_listener().await;
        self.drop_connections();
    }

    fn spawn_accept(&self, listener: TcpListener) {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let cancel = CancellationToken::new();
                inner
                    .connections
                    .lock()
                    .expect("server lock")
                    .insert(id, cancel.clone());
                let inner = inner.clone();
                tokio::spawn(async move {
                    serve_connection(stream, peer, &inner, cancel).await;
                    inner.connections.lock().expect("server lock").remove(&id);
                });
            }
        });
        *self.inner.accept_task.lock().expect("server lock") = Some(task);
    }
}

/// Tracks requests in flight and when the connection last finished one.
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    inner: &Inner,
    cancel: CancellationToken,
) {
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_done: Mutex::new(Instant::now()),
    });
    let control = ConnectionControl {
        cancel: cancel.clone(),
    };
    let router = inner.router.clone();
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(control.clone());
        let activity = service_activity.clone();
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            *activity.last_done.lock().expect("activity lock") = Instant::now();
            activity.in_flight.fetch_sub(1, Ordering::SeqCst);
            response
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        let idle_for = activity.last_done.lock().expect("activity lock").elapsed();
        let timeout = (inner.idle_timeout)();
        let idle = activity.in_flight.load(Ordering::SeqCst) == 0;
        if idle && idle_for >= timeout && !closing {
            // Closes the connection now if no request is in progress, like a server-side
            // keep-alive timeout.
            connection.as_mut().graceful_shutdown();
            closing = true;
        }
        let check_in = timeout
            .saturating_sub(idle_for)
            .max(Duration::from_millis(20));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, %peer, "connection ended with an error");
                }
                return;
            }
            _ = cancel.cancelled() => {
                tracing::debug!(%peer, "connection cut");
                return;
            }
            _ = tokio::time::sleep(check_in) => {}
        }
    }
}
