//! Workspace pools (spec §2.8) and the claim of their warm sandboxes.

use rusqlite::{params, OptionalExtension};

use super::{name_taken, record, records, Store, StoreError};
use crate::model::SandboxRecord;
use crate::pools::PoolRecord;

impl Store {
    /// Inserts the pool if its template still exists (checked in the same statement, so a
    /// concurrent template delete cannot leave a pool without one); `false` when it is gone.
    pub fn insert_pool(&self, pool: &PoolRecord) -> Result<bool, StoreError> {
        let json = serde_json::to_string(pool)?;
        let inserted = self
            .conn()
            .execute(
                "INSERT INTO pools (id, workspace, name, template_id, created_at, record)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6
                 WHERE EXISTS (SELECT 1 FROM templates WHERE id = ?4)",
                params![
                    pool.id,
                    pool.workspace,
                    pool.name,
                    pool.template_id,
                    pool.created_at as i64,
                    json
                ],
            )
            .map_err(|e| name_taken(e, &pool.name))?;
        Ok(inserted > 0)
    }

    pub fn update_pool(&self, pool: &PoolRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(pool)?;
        self.conn()
            .execute(
                "UPDATE pools SET name = ?2, template_id = ?3, record = ?4 WHERE id = ?1",
                params![pool.id, pool.name, pool.template_id, json],
            )
            .map_err(|e| name_taken(e, &pool.name))?;
        Ok(())
    }

    pub fn delete_pool(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM pools WHERE id = ?1", params![id])?;
        Ok(())
    }

    pub fn pool_by_name(
        &self,
        workspace: &str,
        name: &str,
    ) -> Result<Option<PoolRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM pools WHERE workspace = ?1 AND name = ?2",
            params![workspace, name],
        )
    }

    /// A workspace's pools, oldest first; `None` = every workspace's.
    pub fn list_pools(&self, workspace: Option<&str>) -> Result<Vec<PoolRecord>, StoreError> {
        records(
            &self.conn(),
            "SELECT record FROM pools WHERE ?1 IS NULL OR workspace = ?1 ORDER BY created_at, id",
            params![workspace],
        )
    }

    /// The workspace a sandbox row is filed under.
    pub fn sandbox_workspace(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT workspace FROM sandboxes WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Moves the warm sandbox `claimed` (its new workspace, name and settings) out of its
    /// pool's hidden workspace, if it is still there: the update is conditional on the row's
    /// current workspace, so two claimers can never both get it. `false` when someone else did.
    pub fn claim_warm_sandbox(
        &self,
        pool_workspace: &str,
        claimed: &SandboxRecord,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(claimed)?;
        let changed = self
            .conn()
            .execute(
                "UPDATE sandboxes SET workspace = ?3, name = ?4, created_at = ?5, record = ?6
                 WHERE id = ?1 AND workspace = ?2",
                params![
                    claimed.id,
                    pool_workspace,
                    claimed.workspace,
                    claimed.name,
                    claimed.created_at as i64,
                    json
                ],
            )
            .map_err(|e| name_taken(e, &claimed.name))?;
        Ok(changed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;

    fn warm_record(workspace: &str) -> SandboxRecord {
        SandboxRecord {
            id: uuid::Uuid::new_v4().to_string(),
            workspace: workspace.into(),
            name: "sandbox-warm0001".into(),
            status: Status::Ready,
            status_message: None,
            snapshot_id: "s".into(),
            cpu_millicores: Some(250),
            mem_bytes: Some(64 << 20),
            fs_capacity_bytes: None,
            idle_ttl_seconds: 0,
            delete_after_stop_seconds: 0,
            persistent: true,
            labels: Default::default(),
            access_delegation: None,
            run_config: Default::default(),
            created_at: 1,
            updated_at: 1,
            stopped_at: None,
            base: None,
            template_name: None,
            template_id: None,
            runtime: Default::default(),
            proxy_config: None,
        }
    }

    /// The weakened write the positive controls use: the record, wherever the row is now.
    fn write_anywhere(store: &Store, record: &SandboxRecord) {
        let json = serde_json::to_string(record).unwrap();
        store
            .conn()
            .execute(
                "UPDATE sandboxes SET name = ?2, record = ?3 WHERE id = ?1",
                params![record.id, record.name, json],
            )
            .unwrap();
    }

    fn claimed_by(warm: &SandboxRecord, tenant: &str, name: &str) -> SandboxRecord {
        SandboxRecord {
            workspace: tenant.into(),
            name: name.into(),
            created_at: 2,
            ..warm.clone()
        }
    }

    #[test]
    fn a_warm_sandbox_is_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let warm = warm_record("pool:p1");
        store.insert(&warm).unwrap();
        let first = claimed_by(&warm, "tenant-a", "mine");
        assert!(store.claim_warm_sandbox("pool:p1", &first).unwrap());
        let second = claimed_by(&warm, "tenant-b", "theirs");
        assert!(!store.claim_warm_sandbox("pool:p1", &second).unwrap());
        assert_eq!(store.find("tenant-a", "mine").unwrap().unwrap().id, warm.id);
        assert!(store.find("tenant-b", "theirs").unwrap().is_none());
        assert!(store.list(Some("pool:p1")).unwrap().is_empty());

        // Positive control: a claim that only wrote the record (no condition on where the row
        // is) hands the same sandbox to the second tenant too.
        write_anywhere(&store, &second);
        assert_eq!(
            store.get_by_id(&warm.id).unwrap().unwrap().workspace,
            "tenant-b"
        );
    }

    #[test]
    fn a_status_write_from_before_a_claim_does_not_undo_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let warm = warm_record("pool:p1");
        store.insert(&warm).unwrap();
        // Read by the lifecycle before the claim, written after it.
        let mut stale = warm.clone();
        stale.status = Status::Stopped;
        let claimed = claimed_by(&warm, "tenant-a", "mine");
        assert!(store.claim_warm_sandbox("pool:p1", &claimed).unwrap());

        assert!(!store.update(&stale).unwrap());
        let stored = store.get_by_id(&warm.id).unwrap().unwrap();
        assert_eq!(
            (stored.workspace.as_str(), stored.name.as_str()),
            ("tenant-a", "mine")
        );
        assert_eq!(store.find("tenant-a", "mine").unwrap().unwrap(), claimed);
        // A write from after the claim lands.
        let mut fresh = stored;
        fresh.status = Status::Stopped;
        assert!(store.update(&fresh).unwrap());
        assert_eq!(
            store.get_by_id(&warm.id).unwrap().unwrap().status,
            Status::Stopped
        );

        // Positive control: the unconditional write puts the pool's workspace back into the
        // record, so the tenant's sandbox reads as a warm one.
        write_anywhere(&store, &stale);
        assert_eq!(
            store.get_by_id(&warm.id).unwrap().unwrap().workspace,
            "pool:p1"
        );
    }

    #[test]
    fn a_claim_under_a_taken_name_leaves_the_sandbox_warm() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut existing = warm_record("tenant-a");
        existing.name = "taken".into();
        store.insert(&existing).unwrap();
        let warm = warm_record("pool:p1");
        store.insert(&warm).unwrap();
        let claim = claimed_by(&warm, "tenant-a", "taken");
        assert!(matches!(
            store.claim_warm_sandbox("pool:p1", &claim),
            Err(StoreError::NameTaken(_))
        ));
        assert_eq!(store.list(Some("pool:p1")).unwrap().len(), 1);
    }
}
