//! The schema cache: tables and columns of the exposed schema, loaded once at start and on
//! request, so request handling never queries the catalog (as PostgREST does).

use std::collections::HashMap;

/// One column and its type as `format_type` prints it (e.g. `timestamp with time zone`).
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
}

/// One table or view of the exposed schema, columns in `attnum` order.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The exposed schema's tables by name.
#[derive(Debug, Clone, Default)]
pub struct SchemaCache {
    pub tables: HashMap<String, Table>,
}

/// The only exposed schema.
pub const SCHEMA: &str = "public";

impl SchemaCache {
    /// Reads tables, views and their columns in [`SCHEMA`] from the catalog.
    pub async fn load(
        client: &tokio_postgres::Client,
    ) -> Result<SchemaCache, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
                 FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = c.oid
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
                   AND a.attnum > 0 AND NOT a.attisdropped
                   AND c.relname NOT LIKE '\\_emulator%'
                 ORDER BY c.relname, a.attnum",
                &[&SCHEMA],
            )
            .await?;
        let mut tables: HashMap<String, Table> = HashMap::new();
        for row in rows {
            let table: String = row.get(0);
            let entry = tables.entry(table.clone()).or_insert_with(|| Table {
                name: table,
                columns: Vec::new(),
            });
            entry.columns.push(Column {
                name: row.get(1),
                sql_type: row.get(2),
            });
        }
        Ok(SchemaCache { tables })
    }
}
