//! The SQLite store: one row per sandbox, snapshot and registry, the record as JSON beside
//! the indexed columns, and the tags (`name:tag` → snapshot).

mod egress;
mod pools;
mod registries;
mod snapshots;
mod templates;

pub use egress::StoredSecret;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use cordon_image::LayerId;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use crate::model::{LayerRef, SandboxRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("name {0:?} is taken")]
    NameTaken(String),
    #[error("registry name {0:?} is taken")]
    RegistryNameTaken(String),
}

/// Schema changes in order; `PRAGMA user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        record TEXT NOT NULL,
        UNIQUE (workspace, name)
    );",
    // System snapshots are not stored: they come from the prepared cache at every start.
    "CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX snapshots_by_name ON snapshots (workspace, name, created_at);
    CREATE TABLE snapshot_tags (
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        snapshot_id TEXT NOT NULL,
        PRIMARY KEY (workspace, name, tag)
    );
    CREATE INDEX snapshot_tags_by_snapshot ON snapshot_tags (snapshot_id);
    CREATE TABLE registries (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        record TEXT NOT NULL,
        UNIQUE (workspace, name)
    );",
    // A pool's warm sandboxes are rows of `sandboxes` in the pool's hidden workspace.
    "CREATE TABLE templates (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        record TEXT NOT NULL,
        UNIQUE (workspace, name)
    );
    CREATE TABLE pools (
        id TEXT PRIMARY KEY,
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        template_id TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        record TEXT NOT NULL,
        UNIQUE (workspace, name)
    );
    CREATE INDEX pools_by_template ON pools (template_id);",
    // Egress (issue 6): workspace secrets, sealed; egress records, bounded per sandbox.
    "CREATE TABLE workspace_secrets (
        workspace TEXT NOT NULL,
        name TEXT NOT NULL,
        sealed TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (workspace, name)
    );
    CREATE TABLE egress_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX egress_events_by_sandbox ON egress_events (sandbox_id, id);",
];

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating) the database in WAL mode and runs pending migrations.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent; keep serving.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, record: &SandboxRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(record)?;
        self.conn()
            .execute(
                "INSERT INTO sandboxes (id, workspace, name, created_at, record) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![record.id, record.workspace, record.name, record.created_at as i64, json],
            )
            .map_err(|e| name_taken(e, &record.name))?;
        Ok(())
    }

    /// Writes the whole record if the row is still in the record's workspace; `false` (and
    /// nothing written) when it is gone, or when a pool claim moved it since the record was
    /// read: a write from before the claim must not put the pool's workspace back.
    pub fn update(&self, record: &SandboxRecord) -> Result<bool, StoreError> {
        let json = serde_json::to_string(record)?;
        let written = self
            .conn()
            .execute(
                "UPDATE sandboxes SET name = ?2, record = ?3 WHERE id = ?1 AND workspace = ?4",
                params![record.id, record.name, json, record.workspace],
            )
            .map_err(|e| name_taken(e, &record.name))?;
        Ok(written > 0)
    }

    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn get_by_id(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let json: Option<String> = self
            .conn()
            .query_row(
                "SELECT record FROM sandboxes WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// A workspace's sandbox by name, else by id.
    pub fn find(&self, workspace: &str, key: &str) -> Result<Option<SandboxRecord>, StoreError> {
        let json: Option<String> = self
            .conn()
            .query_row(
                "SELECT record FROM sandboxes WHERE workspace = ?1 AND (name = ?2 OR id = ?2)
                 ORDER BY name = ?2 DESC LIMIT 1",
                params![workspace, key],
                |row| row.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// A workspace's sandboxes, oldest first; `None` workspace = all of them.
    pub fn list(&self, workspace: Option<&str>) -> Result<Vec<SandboxRecord>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT record FROM sandboxes WHERE ?1 IS NULL OR workspace = ?1 ORDER BY created_at, id",
        )?;
        let rows = statement.query_map(params![workspace], |row| row.get::<_, String>(0))?;
        let mut records = Vec::new();
        for json in rows {
            records.push(serde_json::from_str(&json?)?);
        }
        Ok(records)
    }
}

impl Store {
    /// Every layer-store layer that a snapshot (in any status) or a sandbox still refers to.
    pub fn layers_in_use(&self) -> Result<HashSet<LayerId>, StoreError> {
        let mut in_use = HashSet::new();
        let mut keep = |layers: &[LayerRef]| {
            for layer in layers {
                if let LayerRef::Stored(id) = layer {
                    in_use.insert(id.clone());
                }
            }
        };
        for sandbox in self.list(None)? {
            if let Some(base) = &sandbox.base {
                keep(&base.layers);
            }
        }
        for snapshot in self.all_snapshots()? {
            keep(&snapshot.layers);
        }
        Ok(in_use)
    }
}

/// Runs `statement` (one `record` column) and parses every row.
fn records<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    statement: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<T>, StoreError> {
    let mut statement = conn.prepare(statement)?;
    let rows = statement.query_map(params, |row| row.get::<_, String>(0))?;
    let mut records = Vec::new();
    for json in rows {
        records.push(serde_json::from_str(&json?)?);
    }
    Ok(records)
}

/// Runs `statement` (one `record` column) and parses the row, if any.
fn record<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    statement: &str,
    params: impl rusqlite::Params,
) -> Result<Option<T>, StoreError> {
    let json: Option<String> = conn
        .query_row(statement, params, |row| row.get(0))
        .optional()?;
    Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let done: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        conn.execute_batch(&format!(
            "BEGIN; {migration} PRAGMA user_version = {}; COMMIT;",
            index + 1
        ))?;
    }
    Ok(())
}

fn name_taken(error: rusqlite::Error, name: &str) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::NameTaken(name.to_string()),
        _ => StoreError::Sqlite(error),
    }
}
