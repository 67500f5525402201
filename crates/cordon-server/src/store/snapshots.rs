//! Workspace snapshots and their tags.

use rusqlite::params;

use super::{record, records, Store, StoreError};
use crate::snapshots::record::{SnapshotRecord, SnapshotStatus};

impl Store {
    pub fn insert_snapshot(&self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(snapshot)?;
        self.conn().execute(
            "INSERT INTO snapshots (id, workspace, name, status, created_at, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                snapshot.id,
                snapshot.workspace,
                snapshot.name,
                snapshot.status.as_str(),
                snapshot.created_at as i64,
                json
            ],
        )?;
        Ok(())
    }

    /// Writes the whole record; false when the row is gone (deleted meanwhile). A ready
    /// snapshot also takes its tag, in the same transaction.
    pub fn update_snapshot(&self, snapshot: &SnapshotRecord) -> Result<bool, StoreError> {
        let json = serde_json::to_string(snapshot)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let updated = tx.execute(
            "UPDATE snapshots SET status = ?2, record = ?3 WHERE id = ?1",
            params![snapshot.id, snapshot.status.as_str(), json],
        )?;
        if updated == 1 && snapshot.status == SnapshotStatus::Ready {
            tx.execute(
                "INSERT INTO snapshot_tags (workspace, name, tag, snapshot_id)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (workspace, name, tag) DO UPDATE SET snapshot_id = excluded.snapshot_id",
                params![snapshot.workspace, snapshot.name, snapshot.tag, snapshot.id],
            )?;
        }
        tx.commit()?;
        Ok(updated == 1)
    }

    /// Removes the snapshot and every tag pointing at it; false when there was none.
    pub fn delete_snapshot(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM snapshot_tags WHERE snapshot_id = ?1",
            params![id],
        )?;
        let deleted = tx.execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        tx.commit()?;
        Ok(deleted == 1)
    }

    pub fn snapshot_by_id(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM snapshots WHERE id = ?1",
            params![id],
        )
    }

    pub fn workspace_snapshot(
        &self,
        workspace: &str,
        id: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM snapshots WHERE workspace = ?1 AND id = ?2",
            params![workspace, id],
        )
    }

    /// The snapshot `name:tag` points at.
    pub fn tagged_snapshot(
        &self,
        workspace: &str,
        name: &str,
        tag: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT s.record FROM snapshot_tags t JOIN snapshots s ON s.id = t.snapshot_id
             WHERE t.workspace = ?1 AND t.name = ?2 AND t.tag = ?3",
            params![workspace, name, tag],
        )
    }

    /// The newest ready snapshot of `name` that no tag points at.
    pub fn newest_untagged_snapshot(
        &self,
        workspace: &str,
        name: &str,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM snapshots s WHERE workspace = ?1 AND name = ?2 AND status = 'ready'
             AND NOT EXISTS (SELECT 1 FROM snapshot_tags t WHERE t.snapshot_id = s.id)
             ORDER BY created_at DESC, id DESC LIMIT 1",
            params![workspace, name],
        )
    }

    /// A workspace's snapshots, newest first.
    pub fn list_snapshots(&self, workspace: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        records(
            &self.conn(),
            "SELECT record FROM snapshots WHERE workspace = ?1 ORDER BY created_at DESC, id DESC",
            params![workspace],
        )
    }

    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        records(
            &self.conn(),
            "SELECT record FROM snapshots ORDER BY created_at",
            [],
        )
    }

    /// Every workspace's snapshots still `building` (after a restart: to build again).
    pub fn building_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        records(
            &self.conn(),
            "SELECT record FROM snapshots WHERE status = 'building' ORDER BY created_at",
            [],
        )
    }

    /// The tags pointing at a snapshot, sorted.
    pub fn tags_of(&self, snapshot_id: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare("SELECT tag FROM snapshot_tags WHERE snapshot_id = ?1 ORDER BY tag")?;
        let rows = statement.query_map(params![snapshot_id], |row| row.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// `(tag, snapshot id)` of every tag under `name`, sorted by tag.
    pub fn tags_by_name(
        &self,
        workspace: &str,
        name: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT tag, snapshot_id FROM snapshot_tags WHERE workspace = ?1 AND name = ?2
             ORDER BY tag",
        )?;
        let rows = statement.query_map(params![workspace, name], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// True when some snapshot of the workspace has (or had a build under) `name`.
    pub fn snapshot_name_exists(&self, workspace: &str, name: &str) -> Result<bool, StoreError> {
        let found: i64 = self.conn().query_row(
            "SELECT EXISTS (SELECT 1 FROM snapshots WHERE workspace = ?1 AND name = ?2)",
            params![workspace, name],
            |row| row.get(0),
        )?;
        Ok(found == 1)
    }
}
