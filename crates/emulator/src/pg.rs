//! Throwaway PostgreSQL databases for tests and the demo: either a fresh database on the
//! server named by `DATABASE_URL`, or a private cluster (`initdb` + `pg_ctl`) in a temporary
//! folder. Both get `scripts/schema.sql` loaded and are removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rand::Rng;
use tokio_postgres::NoTls;

/// The schema every emulator database starts with: the local-only roles, grants and
/// publication (PART 2), then the `jobs` table (PART 1).
pub const SCHEMA_SQL: &str = include_str!("../../../scripts/schema.sql");

/// How many times a cluster start is retried when another process took the chosen port
/// between picking it and the server binding it.
const START_ATTEMPTS: usize = 8;

/// A database that exists for as long as this value lives.
pub struct TestDatabase {
    url: String,
    kind: Kind,
}

enum Kind {
    /// A database created on an existing server; dropped with `DROP DATABASE … WITH (FORCE)`.
    OnServer { admin_url: String, name: String },
    /// A private cluster; stopped with `pg_ctl stop -m immediate` and its folder deleted.
    Cluster(Cluster),
}

struct Cluster {
    pg_ctl: PathBuf,
    data_dir: PathBuf,
    as_postgres_user: bool,
    /// Deleted after the server stops, because `TempDir` removes the folder on drop.
    _folder: tempfile::TempDir,
}

impl TestDatabase {
    /// Creates a database with the schema loaded.
    ///
    /// With `DATABASE_URL` set, creates a randomly named database on that server. Otherwise
    /// starts a private cluster on a free 127.0.0.1 port, running the server binaries as the
    /// `postgres` user when this process runs as root.
    pub async fn start() -> anyhow::Result<TestDatabase> {
        let database = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => create_on_server(&url).await?,
            _ => tokio::task::spawn_blocking(start_cluster)
                .await
                .context("cluster start task panicked")??,
        };
        load_schema(&database.url).await?;
        Ok(database)
    }

    /// A `postgres://` URL for tokio-postgres, libpq and psql.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match &self.kind {
            Kind::OnServer { admin_url, name } => drop_database(admin_url, name),
            Kind::Cluster(cluster) => cluster.stop(),
        }
    }
}

/// Runs the whole schema file. Roles are cluster-wide, so tests sharing one server can race
/// on `CREATE ROLE` or `GRANT`; those conflicts are retried.
async fn load_schema(url: &str) -> anyhow::Result<()> {
    let mut last_error = None;
    for attempt in 0..5u64 {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .with_context(|| format!("failed to connect to the new database at {url}"))?;
        let driver = tokio::spawn(connection);
        let result = client.batch_execute(SCHEMA_SQL).await;
        drop(client);
        let _ = driver.await;
        match result {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(attempt, %error, "schema load failed, retrying");
                last_error = Some(error);
                tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
            }
        }
    }
    Err(anyhow!(last_error.expect("at least one attempt ran"))).context("failed to load schema.sql")
}

async fn create_on_server(admin_url: &str) -> anyhow::Result<TestDatabase> {
    let name = format!("emulator_{:016x}", rand::rng().random::<u64>());
    let (client, connection) = tokio_postgres::connect(admin_url, NoTls)
        .await
        .context("failed to connect to DATABASE_URL")?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .with_context(|| format!("failed to create database {name} on DATABASE_URL"))?;
    drop(client);
    let _ = driver.await;
    Ok(TestDatabase {
        url: replace_database_name(admin_url, &name),
        kind: Kind::OnServer {
            admin_url: admin_url.to_string(),
            name,
        },
    })
}

/// Returns `url` with its database name replaced by `name`. Handles both the URL form
/// (`postgres://user@host:port/db?opts`) and the key=value form.
fn replace_database_name(url: &str, name: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={name}");
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let query_start = rest.find('?').map_or(url.len(), |i| authority_start + i);
    let path_start = rest[..query_start - authority_start]
        .find('/')
        .map_or(query_start, |i| authority_start + i);
    format!("{}/{name}{}", &url[..path_start], &url[query_start..])
}

/// Drops the database from a fresh thread with its own runtime, because `Drop` may run on a
/// runtime thread where blocking on async code would panic.
fn drop_database(admin_url: &str, name: &str) {
    let admin_url = admin_url.to_string();
    let name = name.to_string();
    let worker = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                tracing::warn!(%error, database = %name, "failed to build runtime to drop database");
                return;
            }
        };
        runtime.block_on(async {
            let work = async {
                let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await?;
                let driver = tokio::spawn(connection);
                let result = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
                drop(client);
                let _ = driver.await;
                result
            };
            match tokio::time::timeout(Duration::from_secs(10), work).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, database = %name, "failed to drop database")
                }
                Err(_) => tracing::warn!(database = %name, "timed out dropping database"),
            }
        });
    });
    let _ = worker.join();
}

/// Finds a PostgreSQL server binary on PATH or under `/usr/lib/postgresql/<version>/bin`,
/// newest version first.
fn find_binary(name: &str) -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin").join(name)))
        })
        .filter(|(_, path)| path.is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path)
}

fn is_root() -> bool {
    run_capture(Command::new("id").arg("-u"))
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run_capture(command: &mut Command) -> std::io::Result<Output> {
    command.stdin(std::process::Stdio::null()).output()
}

/// Returns the uid and gid of the `postgres` user.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let read = |flag: &str| -> anyhow::Result<u32> {
        let out = run_capture(Command::new("id").args([flag, "postgres"]))?;
        if !out.status.success() {
            bail!("user postgres not found");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((read("-u")?, read("-g")?))
}

const INSTALL_HINT: &str =
    "install the PostgreSQL server (Debian/Ubuntu: `apt-get install postgresql`) \
     or set DATABASE_URL to a server where this user may CREATE DATABASE";

fn start_cluster() -> anyhow::Result<TestDatabase> {
    let initdb = find_binary("initdb").ok_or_else(|| {
        anyhow!("initdb not found on PATH or under /usr/lib/postgresql: {INSTALL_HINT}")
    })?;
    let pg_ctl = find_binary("pg_ctl").ok_or_else(|| {
        anyhow!("pg_ctl not found on PATH or under /usr/lib/postgresql: {INSTALL_HINT}")
    })?;
    let as_postgres_user = is_root();

    let folder = tempfile::Builder::new()
        .prefix("supabase-emulator-pg-")
        .tempdir()
        .context("failed to create a temporary folder for the cluster")?;
    if as_postgres_user {
        // initdb and postgres refuse to run as root, so the cluster belongs to `postgres`.
        let (uid, gid) = postgres_ids().map_err(|error| {
            anyhow!("running as root needs the `postgres` user to own the cluster ({error}): {INSTALL_HINT}")
        })?;
        std::os::unix::fs::chown(folder.path(), Some(uid), Some(gid))
            .context("failed to hand the cluster folder to the postgres user")?;
    }
    let data_dir = folder.path().join("data");

    let out = run_as(
        as_postgres_user,
        &initdb,
        &[
            "-D".as_ref(),
            data_dir.as_os_str(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "--auth=trust".as_ref(),
            "--no-sync".as_ref(),
            "--encoding=UTF8".as_ref(),
            "--locale=C".as_ref(),
        ],
    )
    .with_context(|| format!("failed to run {}: {INSTALL_HINT}", initdb.display()))?;
    if !out.status.success() {
        bail!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let cluster = Cluster {
        pg_ctl,
        data_dir,
        as_postgres_user,
        _folder: folder,
    };
    let mut last_error = String::new();
    for attempt in 0..START_ATTEMPTS {
        let port = free_port()?;
        match cluster.start(port) {
            Ok(()) => {
                return Ok(TestDatabase {
                    url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                    kind: Kind::Cluster(cluster),
                });
            }
            Err(error) => {
                tracing::warn!(attempt, port, %error, "cluster start failed, retrying on another port");
                last_error = error.to_string();
            }
        }
    }
    bail!("failed to start PostgreSQL after {START_ATTEMPTS} attempts: {last_error}")
}

/// Picks a free TCP port on 127.0.0.1 by binding port 0. Another process may take it before
/// the server binds it, so the caller retries on failure.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("failed to bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn run_as(
    as_postgres_user: bool,
    program: &Path,
    args: &[&std::ffi::OsStr],
) -> std::io::Result<Output> {
    let mut command = if as_postgres_user {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    };
    command.args(args);
    // A folder the postgres user can enter; the caller's folder may be private to root.
    command.current_dir(std::env::temp_dir());
    run_capture(&mut command)
}

impl Cluster {
    fn start(&self, port: u16) -> anyhow::Result<()> {
        let socket_dir = self.data_dir.parent().expect("data dir has a parent");
        let options = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=300 -c shared_buffers=32MB -c timezone=UTC",
            socket_dir.display()
        );
        let log_file = socket_dir.join("postgres.log");
        let out = run_as(
            self.as_postgres_user,
            &self.pg_ctl,
            &[
                "-D".as_ref(),
                self.data_dir.as_os_str(),
                "-l".as_ref(),
                log_file.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "start".as_ref(),
            ],
        )?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        // A failed start can leave a half-started server behind; stop it before retrying.
        self.stop();
        bail!(
            "pg_ctl start failed: {}{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        )
    }

    /// Stops the server without a checkpoint. `-t 10` bounds the wait so a drop cannot hang.
    fn stop(&self) {
        let result = run_as(
            self.as_postgres_user,
            &self.pg_ctl,
            &[
                "-D".as_ref(),
                self.data_dir.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "10".as_ref(),
                "stop".as_ref(),
            ],
        );
        if let Err(error) = result {
            tracing::warn!(%error, "failed to run pg_ctl stop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::replace_database_name;

    #[test]
    fn database_name_replaced_in_urls() {
        let cases = [
            ("postgres://u@h:5432/db", "postgres://u@h:5432/x"),
            ("postgres://u@h:5432", "postgres://u@h:5432/x"),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("host=h user=u", "host=h user=u dbname=x"),
        ];
        for (input, expected) in cases {
            assert_eq!(replace_database_name(input, "x"), expected, "input {input}");
        }
    }
}
