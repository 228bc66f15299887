//! Test support for the Realtime tests: a throwaway PostgreSQL cluster shared by the tests
//! of one test binary (one database per test, cloned from a template that has the schema),
//! an emulator started on it, and a small websocket client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use supabase_emulator::auth::Keys;
use supabase_emulator::realtime::{Realtime, RealtimeOptions};
use supabase_emulator::{Emulator, EmulatorOptions};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in these tests: a guard against hangs, not a timing check.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

pub const JWT_SECRET: &str = "realtime-test-secret-with-at-least-32-chars";

struct Cluster {
    port: u16,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static TEMPLATE_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a Postgres binary, as the `postgres` user when the tests run as root (initdb and
/// postgres refuse to run as root).
fn pg_command(program: &str) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", program]);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

// The postgres process outlives every test of the binary; the watchdog stops it after the
// test process exits, so nothing here waits for it.
#[allow(clippy::zombie_processes)]
fn start_cluster() -> Cluster {
    let directory: PathBuf = tempfile::Builder::new()
        .prefix("realtime-test-pg-")
        .tempdir()
        .expect("create temporary directory")
        .keep();
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&directory)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown of {} failed", directory.display());
    }
    let data = directory.join("data");
    let output = pg_command("initdb")
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .output()
        .expect("run initdb (is PostgreSQL installed?)");
    assert!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Another test process may take the free port before postgres binds it. Readiness is
    // checked on this cluster's own unix socket, so a foreign server on the port is never
    // mistaken for ours; if ours exits, it is started again on a new port.
    for _attempt in 0..5 {
        let port = free_port();
        let log = std::fs::File::create(directory.join("postgres.log")).expect("create log file");
        let mut child = pg_command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&directory)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        for _ in 0..200 {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            let ready = Command::new("pg_isready")
                .arg("-h")
                .arg(&directory)
                .args(["-p", &port.to_string()])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                spawn_watchdog(&directory);
                return Cluster { port };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!(
        "postgres did not start; see {}",
        directory.join("postgres.log").display()
    );
}

/// Stops the cluster and removes its directory once this test process has exited, because
/// statics are never dropped. The postmaster's pid comes from `postmaster.pid`, since the
/// spawned process may be the `runuser` wrapper, which does not forward signals.
#[allow(clippy::zombie_processes)]
fn spawn_watchdog(directory: &Path) {
    let script = format!(
        "while [ -e /proc/{test} ] && ! grep -q '^State:.*Z' /proc/{test}/status 2>/dev/null; \
         do sleep 1; done; \
         pid=$(head -n 1 '{dir}/data/postmaster.pid' 2>/dev/null); \
         [ -n \"$pid\" ] && kill -INT \"$pid\"; \
         while [ -e '{dir}/data/postmaster.pid' ]; do sleep 1; done; rm -rf '{dir}'",
        test = std::process::id(),
        dir = directory.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cluster watchdog");
}

fn schema_sql() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/schema.sql");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn url(port: u16, database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{database}")
}

/// Creates a fresh database with the jobs schema and returns its URL.
pub async fn create_database() -> String {
    let port = CLUSTER.get_or_init(start_cluster).port;
    TEMPLATE_READY
        .get_or_init(|| async move {
            let template = url(port, "template1");
            let (client, connection) = tokio_postgres::connect(&template, tokio_postgres::NoTls)
                .await
                .expect("connect to template1");
            let driver = tokio::spawn(connection);
            client
                .batch_execute(&schema_sql())
                .await
                .expect("apply schema.sql to template1");
            drop(client);
            let _ = driver.await;
        })
        .await;
    let name = format!(
        "rt_{}_{}",
        std::process::id(),
        DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let client = connect(&url(port, "postgres")).await;
    client
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE template1"))
        .await
        .expect("create test database");
    url(port, &name)
}

/// Connects a tokio-postgres client and drives its connection in the background.
pub async fn connect(database_url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .expect("connect to test database");
    tokio::spawn(connection);
    client
}

/// A started emulator over a fresh database of the shared test cluster.
pub struct TestServer {
    pub emulator: Emulator,
    pub realtime: Realtime,
    pub keys: Arc<Keys>,
    pub address: std::net::SocketAddr,
    pub database_url: String,
    pub db: tokio_postgres::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(RealtimeOptions::for_tests()).await
    }

    pub async fn start_with(options: RealtimeOptions) -> TestServer {
        let database_url = create_database().await;
        let emulator = Emulator::start(EmulatorOptions {
            database_url: Some(database_url.clone()),
            jwt_secret: JWT_SECRET.to_string(),
            realtime: options,
            ..EmulatorOptions::default()
        })
        .await
        .expect("start emulator");
        let address = emulator
            .url()
            .trim_start_matches("http://")
            .parse()
            .expect("emulator URL has a socket address");
        let db = connect(&database_url).await;
        TestServer {
            realtime: emulator.realtime().clone(),
            keys: Arc::new(emulator.keys().clone()),
            emulator,
            address,
            database_url,
            db,
        }
    }

    /// POSTs a JSON body to a Realtime control route such as `/faults/stall`.
    pub async fn control(&self, route: &str, body: Value) {
        let url = format!("{}/realtime{route}", self.emulator.control_url());
        let response = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .send()
            .await
            .expect("control request");
        assert_eq!(response.status().as_u16(), 204, "POST {url}");
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.address, path_and_query)
    }

    /// Opens a socket at `/realtime/v1/websocket` with the service_role key and `vsn`.
    pub async fn socket(&self, vsn: &str) -> TestSocket {
        let key = self.keys.service_role_jwt.clone();
        self.socket_with_key(vsn, &key).await
    }

    pub async fn socket_with_key(&self, vsn: &str, key: &str) -> TestSocket {
        let path = format!("/realtime/v1/websocket?apikey={key}&vsn={vsn}");
        self.socket_at(&path, vsn == "2.0.0").await
    }

    /// Opens a socket at `path_and_query`; `v2` selects how frames are decoded.
    pub async fn socket_at(&self, path_and_query: &str, v2: bool) -> TestSocket {
        let url = self.url(path_and_query);
        let (ws, _) = tokio::time::timeout(HANG_GUARD, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("websocket connect failed");
        TestSocket {
            ws,
            v2,
            next_ref: 1,
        }
    }

    /// Inserts a job and returns its id.
    pub async fn insert_job(&self, action: &str) -> i64 {
        self.db
            .query_one(
                "INSERT INTO public.jobs (action) VALUES ($1) RETURNING id",
                &[&action],
            )
            .await
            .expect("insert job")
            .get(0)
    }
}

/// A decoded server frame, from either serializer.
#[derive(Debug, Clone)]
pub struct Received {
    pub join_ref: Value,
    pub reference: Value,
    pub topic: String,
    pub event: String,
    pub payload: Value,
    pub raw: Value,
}

/// What `TestSocket::next` got.
#[derive(Debug)]
pub enum Incoming {
    Frame(Received),
    Close(Option<u16>),
    /// The connection ended without a close frame.
    Dropped,
}

pub struct TestSocket {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub v2: bool,
    next_ref: u64,
}

/// Builds the join payload realtime-js sends for one postgres_changes binding list.
pub fn join_payload(postgres_changes: Value) -> Value {
    json!({
        "config": {
            "broadcast": {"ack": false, "self": false},
            "presence": {"key": "", "enabled": false},
            "postgres_changes": postgres_changes,
            "private": false
        }
    })
}

impl TestSocket {
    pub fn new_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .expect("send frame");
    }

    pub async fn send(
        &mut self,
        join_ref: Option<&str>,
        reference: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) {
        let frame = if self.v2 {
            json!([join_ref, reference, topic, event, payload])
        } else {
            json!({"topic": topic, "event": event, "payload": payload, "ref": reference, "join_ref": join_ref})
        };
        self.send_raw(&frame.to_string()).await;
    }

    /// Sends `phx_join` and returns the ref used (also the join_ref).
    pub async fn join(&mut self, topic: &str, payload: Value) -> String {
        let reference = self.new_ref();
        self.send(Some(&reference), &reference, topic, "phx_join", payload)
            .await;
        reference
    }

    /// Joins, expects the ok reply and the readiness message, and returns the join_ref and
    /// the reply payload.
    pub async fn join_ready(&mut self, topic: &str, payload: Value) -> (String, Value) {
        let join_ref = self.join(topic, payload).await;
        let reply = self.expect_event("phx_reply").await;
        assert_eq!(reply.payload["status"], "ok", "join reply: {:?}", reply.raw);
        let ready = self.expect_event("system").await;
        assert_eq!(
            ready.payload["message"], "Subscribed to PostgreSQL",
            "{:?}",
            ready.raw
        );
        (join_ref, reply.payload)
    }

    pub async fn next(&mut self) -> Incoming {
        loop {
            let message = tokio::time::timeout(HANG_GUARD, self.ws.next())
                .await
                .expect("no frame within the hang guard");
            match message {
                None | Some(Err(_)) => return Incoming::Dropped,
                Some(Ok(Message::Close(frame))) => {
                    return Incoming::Close(frame.map(|f| u16::from(f.code)))
                }
                Some(Ok(Message::Text(text))) => {
                    let raw: Value = serde_json::from_str(text.as_str()).expect("frame is JSON");
                    let received = if self.v2 {
                        let items = raw.as_array().expect("V2 frame is an array");
                        assert_eq!(items.len(), 5, "V2 frame has five elements: {raw}");
                        Received {
                            join_ref: items[0].clone(),
                            reference: items[1].clone(),
                            topic: items[2].as_str().unwrap().to_string(),
                            event: items[3].as_str().unwrap().to_string(),
                            payload: items[4].clone(),
                            raw: raw.clone(),
                        }
                    } else {
                        assert!(
                            raw.get("join_ref").is_none(),
                            "V1 frame has join_ref: {raw}"
                        );
                        Received {
                            join_ref: Value::Null,
                            reference: raw["ref"].clone(),
                            topic: raw["topic"].as_str().unwrap().to_string(),
                            event: raw["event"].as_str().unwrap().to_string(),
                            payload: raw["payload"].clone(),
                            raw: raw.clone(),
                        }
                    };
                    return Incoming::Frame(received);
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn next_frame(&mut self) -> Received {
        match self.next().await {
            Incoming::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Reads the next frame and checks its event name.
    pub async fn expect_event(&mut self, event: &str) -> Received {
        let frame = self.next_frame().await;
        assert_eq!(frame.event, event, "unexpected frame {:?}", frame.raw);
        frame
    }

    /// Sends a heartbeat and returns every frame received before its reply.
    pub async fn frames_before_heartbeat_reply(&mut self) -> Vec<Received> {
        let reference = self.new_ref();
        self.send(None, &reference, "phoenix", "heartbeat", json!({}))
            .await;
        let mut before = Vec::new();
        loop {
            let frame = self.next_frame().await;
            if frame.topic == "phoenix" && frame.reference == json!(reference) {
                return before;
            }
            before.push(frame);
        }
    }

    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Incoming::Close(code) => return code,
                Incoming::Dropped => panic!("connection dropped without a close frame"),
                Incoming::Frame(_) => continue,
            }
        }
    }
}

/// Builds the standard one-binding join: INSERTs on public.jobs.
pub fn jobs_inserts() -> Value {
    join_payload(json!([{"event": "INSERT", "schema": "public", "table": "jobs"}]))
}
