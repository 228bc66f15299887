//! Change capture from committed rows: the `_emulator` schema, the row trigger installed on
//! every table of the `supabase_realtime` publication, and the LISTEN connection that
//! receives each change at commit, in commit order.
//!
//! The trigger sends the change as the payload of `pg_notify('_emulator_changes', …)`.
//! Postgres delivers notifications when the transaction commits, in commit order, and
//! drops them when it rolls back, so subscribers see only committed rows. A change whose
//! JSON does not fit in a notification (8000 bytes) is written to `_emulator.changes` and
//! the notification carries `id:<n>`. The reader deletes that row when it reads it.
//!
//! The trigger records only the (table, operation) pairs listed in `_emulator.wanted`,
//! which the server rewrites whenever its subscriptions change.
// NOTE: two emulators serving the same database overwrite each other's `_emulator.wanted`,
// so each may miss changes that only the other's subscribers need.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// The NOTIFY channel the capture trigger writes to.
pub const NOTIFY_CHANNEL: &str = "_emulator_changes";

/// The publication whose tables Realtime delivers changes for.
pub const PUBLICATION: &str = "supabase_realtime";

const INSTALL_SQL: &str = r#"
SELECT pg_advisory_xact_lock(7226501);
CREATE SCHEMA IF NOT EXISTS _emulator;
CREATE SEQUENCE IF NOT EXISTS _emulator.change_seq;
CREATE TABLE IF NOT EXISTS _emulator.changes (
  id      bigserial PRIMARY KEY,
  payload jsonb NOT NULL
);
-- The (table, operation) pairs some channel subscribes to. The trigger skips all others,
-- so writes nobody listens to do not pay for NOTIFY.
CREATE TABLE IF NOT EXISTS _emulator.wanted (
  relid oid  NOT NULL,
  op    text NOT NULL,
  PRIMARY KEY (relid, op)
);
CREATE OR REPLACE FUNCTION _emulator.capture_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
  change text;
  stored_id bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM _emulator.wanted WHERE relid = TG_RELID AND op = TG_OP) THEN
    RETURN NULL;
  END IF;
  -- `seq` keeps two equal changes of one transaction distinct, because Postgres folds
  -- identical notifications of a transaction into one.
  change := jsonb_build_object(
    'seq', nextval('_emulator.change_seq'),
    'schema', TG_TABLE_SCHEMA,
    'table', TG_TABLE_NAME,
    'type', TG_OP,
    'commit_timestamp',
      to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'record', CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
    'old_record', CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END
  )::text;
  IF octet_length(change) < 7900 THEN
    PERFORM pg_notify('_emulator_changes', change);
  ELSE
    INSERT INTO _emulator.changes (payload) VALUES (change::jsonb) RETURNING id INTO stored_id;
    PERFORM pg_notify('_emulator_changes', 'id:' || stored_id);
  END IF;
  RETURN NULL;
END
$fn$;
"#;

/// Errors of the capture connection. A retry helps only for [`CaptureError::Connect`].
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("failed to connect to Postgres for change capture (retry may help): {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("failed to install the change capture trigger (retry will not help): {0}")]
    Install(#[source] tokio_postgres::Error),
    #[error("change capture query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("change capture connection pool failed: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// One committed row change, as the trigger recorded it.
#[derive(Debug, Clone, Deserialize)]
pub struct Change {
    pub schema: String,
    pub table: String,
    /// `INSERT`, `UPDATE` or `DELETE`.
    #[serde(rename = "type")]
    pub change_type: String,
    /// Transaction start time in UTC, `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    // NOTE: the real server reports the commit time. The trigger cannot see it, so this is
    // the transaction's start time, which is shared by all rows of the transaction.
    pub commit_timestamp: String,
    pub record: Option<Value>,
    pub old_record: Option<Value>,
}

/// Facts about a published table that shape its events.
#[derive(Debug, Clone)]
pub struct TableMeta {
    /// `[{name, type}]` in column order, `type` being the Postgres `typname`.
    pub columns: Value,
    pub primary_key: Vec<String>,
    /// `REPLICA IDENTITY FULL`: UPDATE and DELETE events carry the whole old row.
    pub replica_identity_full: bool,
    pub row_security: bool,
}

/// Creates the `_emulator` schema objects and the capture trigger on every published table.
pub async fn install(client: &mut tokio_postgres::Client) -> Result<(), CaptureError> {
    let transaction = client.transaction().await.map_err(CaptureError::Install)?;
    transaction
        .batch_execute(INSTALL_SQL)
        .await
        .map_err(CaptureError::Install)?;
    transaction.commit().await.map_err(CaptureError::Install)?;
    ensure_triggers(client).await
}

/// Installs the capture trigger on published tables that lack it, for example a table added
/// to the publication after the emulator started.
pub async fn ensure_triggers(client: &tokio_postgres::Client) -> Result<(), CaptureError> {
    let rows = client
        .query(
            "SELECT format('%I.%I', p.schemaname, p.tablename)
             FROM pg_publication_tables p
             WHERE p.pubname = $1 AND NOT EXISTS (
               SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid = format('%I.%I', p.schemaname, p.tablename)::regclass
                 AND t.tgname = '_emulator_capture')",
            &[&PUBLICATION],
        )
        .await?;
    for row in rows {
        let table: String = row.get(0);
        let sql = format!(
            "CREATE OR REPLACE TRIGGER _emulator_capture
             AFTER INSERT OR UPDATE OR DELETE ON {table}
             FOR EACH ROW EXECUTE FUNCTION _emulator.capture_change()"
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(CaptureError::Install)?;
        tracing::info!(table = %table, "installed change capture trigger");
    }
    Ok(())
}

/// Replaces the set of captured (table, operation) pairs. Each entry is `(schema, table,
/// event)` from a binding, where `*` matches every published schema or table and every
/// operation.
pub async fn set_wanted(
    client: &mut tokio_postgres::Client,
    entries: &[(String, String, String)],
) -> Result<(), CaptureError> {
    let schemas: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let tables: Vec<&str> = entries.iter().map(|e| e.1.as_str()).collect();
    let events: Vec<&str> = entries.iter().map(|e| e.2.as_str()).collect();
    let transaction = client.transaction().await?;
    transaction
        .execute("DELETE FROM _emulator.wanted", &[])
        .await?;
    transaction
        .execute(
            "INSERT INTO _emulator.wanted (relid, op)
             SELECT DISTINCT format('%I.%I', p.schemaname, p.tablename)::regclass::oid, o.op
             FROM pg_publication_tables p
             JOIN unnest($2::text[], $3::text[], $4::text[]) AS w(schema_name, table_name, event)
               ON (w.schema_name = '*' OR w.schema_name = p.schemaname)
              AND (w.table_name = '*' OR w.table_name = p.tablename)
             CROSS JOIN LATERAL unnest(CASE WHEN w.event = '*'
                 THEN ARRAY['INSERT', 'UPDATE', 'DELETE'] ELSE ARRAY[w.event] END) AS o(op)
             WHERE p.pubname = $1",
            &[&PUBLICATION, &schemas, &tables, &events],
        )
        .await?;
    transaction.commit().await?;
    Ok(())
}

/// Connects the LISTEN session and forwards each notification payload to `sender` until
/// the connection ends. Returns once LISTEN is active, so no commit after this is missed.
/// The session lasts as long as the returned client is kept.
pub async fn listen(
    config: &tokio_postgres::Config,
    sender: mpsc::UnboundedSender<String>,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), CaptureError> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(CaptureError::Connect)?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let driver = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    if sender.send(notification.payload().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    // TODO: reconnect; until then events stop after the session is lost.
                    tracing::error!(%error, "change capture connection failed");
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
        .map_err(CaptureError::Query)?;
    Ok((client, driver))
}

/// Decodes one notification payload, reading and deleting the stored row for `id:<n>`.
pub async fn read_change(
    pool: &deadpool_postgres::Pool,
    payload: &str,
) -> Result<Change, CaptureError> {
    let text = match payload.strip_prefix("id:") {
        None => payload.to_string(),
        Some(id) => {
            let id: i64 = id.parse().unwrap_or(-1);
            let client = pool.get().await?;
            let row = client
                .query_one(
                    "DELETE FROM _emulator.changes WHERE id = $1 RETURNING payload::text",
                    &[&id],
                )
                .await?;
            row.get(0)
        }
    };
    Ok(serde_json::from_str(&text).unwrap_or_else(|error| {
        tracing::error!(%error, "undecodable change notification");
        Change {
            schema: String::new(),
            table: String::new(),
            change_type: String::new(),
            commit_timestamp: String::new(),
            record: None,
            old_record: None,
        }
    }))
}

/// A cache of [`TableMeta`] per `(schema, table)`, emptied whenever a channel subscribes.
// NOTE: between subscriptions entries are not refreshed, so a column, key or replica
// identity change shows in events only after the next subscription.
#[derive(Default)]
pub struct TableCache {
    tables: Mutex<HashMap<(String, String), TableMeta>>,
}

impl TableCache {
    /// Forgets every entry, so the next event of each table reads the catalog again.
    pub fn clear(&self) {
        self.tables.lock().expect("table cache lock").clear();
    }

    /// Returns the metadata of `schema.table`, reading the catalog on first use.
    pub async fn get(
        &self,
        pool: &deadpool_postgres::Pool,
        schema: &str,
        table: &str,
    ) -> Result<TableMeta, CaptureError> {
        let key = (schema.to_string(), table.to_string());
        if let Some(meta) = self.tables.lock().expect("table cache lock").get(&key) {
            return Ok(meta.clone());
        }
        let client = pool.get().await?;
        let relation = client
            .query_one(
                "SELECT c.oid, c.relreplident = 'f', c.relrowsecurity
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &table],
            )
            .await?;
        let oid: u32 = relation.get(0);
        let columns = client
            .query(
                "SELECT a.attname::text, t.typname::text
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let primary_key = client
            .query(
                "SELECT a.attname::text
                 FROM pg_index i
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position) ON true
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1 AND i.indisprimary
                 ORDER BY k.position",
                &[&oid],
            )
            .await?;
        let meta = TableMeta {
            columns: Value::Array(
                columns
                    .iter()
                    .map(|row| {
                        serde_json::json!({
                            "name": row.get::<_, String>(0),
                            "type": row.get::<_, String>(1),
                        })
                    })
                    .collect(),
            ),
            primary_key: primary_key.iter().map(|row| row.get(0)).collect(),
            replica_identity_full: relation.get(1),
            row_security: relation.get(2),
        };
        self.tables
            .lock()
            .expect("table cache lock")
            .insert(key, meta.clone());
        Ok(meta)
    }
}
