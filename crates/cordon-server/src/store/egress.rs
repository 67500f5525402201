//! Workspace secrets (sealed values) and egress records.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// A workspace secret as stored: the value is sealed (`secret_sealing`), never plaintext.
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub name: String,
    pub sealed: String,
    pub created_at: u64,
    pub updated_at: u64,
}

impl Store {
    /// Creates or replaces a secret; keeps `created_at` of an existing one.
    pub fn put_secret(
        &self,
        workspace: &str,
        name: &str,
        sealed: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO workspace_secrets (workspace, name, sealed, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (workspace, name) DO UPDATE SET sealed = ?3, updated_at = ?4",
            params![workspace, name, sealed, now as i64],
        )?;
        Ok(())
    }

    pub fn get_secret(
        &self,
        workspace: &str,
        name: &str,
    ) -> Result<Option<StoredSecret>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, sealed, created_at, updated_at FROM workspace_secrets
                 WHERE workspace = ?1 AND name = ?2",
                params![workspace, name],
                stored_secret,
            )
            .optional()?)
    }

    /// A workspace's secrets by name (sealed values included; callers drop them).
    pub fn list_secrets(&self, workspace: &str) -> Result<Vec<StoredSecret>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT name, sealed, created_at, updated_at FROM workspace_secrets
             WHERE workspace = ?1 ORDER BY name",
        )?;
        let rows = statement.query_map(params![workspace], stored_secret)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn count_secrets(&self, workspace: &str) -> Result<usize, StoreError> {
        let count: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM workspace_secrets WHERE workspace = ?1",
            params![workspace],
            |row| row.get(0),
        )?;
        Ok(count as usize)
    }

    /// `true` when there was one.
    pub fn delete_secret(&self, workspace: &str, name: &str) -> Result<bool, StoreError> {
        let deleted = self.conn().execute(
            "DELETE FROM workspace_secrets WHERE workspace = ?1 AND name = ?2",
            params![workspace, name],
        )?;
        Ok(deleted > 0)
    }

    /// Appends egress records (`(sandbox id, record JSON)`) in one transaction, then keeps
    /// only the newest `keep` of each sandbox written to. Records of a sandbox deleted while
    /// they waited in the queue are dropped, so none outlive it.
    pub fn append_egress_events(
        &self,
        events: &[(String, String)],
        keep: usize,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let transaction = conn.transaction()?;
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO egress_events (sandbox_id, record)
                 SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)",
            )?;
            for (sandbox, record) in events {
                insert.execute(params![sandbox, record])?;
            }
            let mut sandboxes: Vec<&String> = events.iter().map(|(id, _)| id).collect();
            sandboxes.sort();
            sandboxes.dedup();
            let mut prune = transaction.prepare_cached(
                "DELETE FROM egress_events WHERE sandbox_id = ?1 AND id <= (
                     SELECT id FROM egress_events WHERE sandbox_id = ?1
                     ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?;
            for sandbox in sandboxes {
                prune.execute(params![sandbox, keep as i64])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    /// A sandbox's egress records (JSON), newest first.
    pub fn egress_events(&self, sandbox_id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut statement = conn
            .prepare("SELECT record FROM egress_events WHERE sandbox_id = ?1 ORDER BY id DESC")?;
        let rows = statement.query_map(params![sandbox_id], |row| row.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn delete_egress_events(&self, sandbox_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM egress_events WHERE sandbox_id = ?1",
            params![sandbox_id],
        )?;
        Ok(())
    }
}

fn stored_secret(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredSecret> {
    Ok(StoredSecret {
        name: row.get(0)?,
        sealed: row.get(1)?,
        created_at: row.get::<_, i64>(2)? as u64,
        updated_at: row.get::<_, i64>(3)? as u64,
    })
}
