//! Workspace registries (spec §2.6); their passwords are sealed before they get here.

use rusqlite::params;

use super::{record, records, Store, StoreError};
use crate::registries::RegistryRecord;

impl Store {
    pub fn insert_registry(&self, registry: &RegistryRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(registry)?;
        self.conn()
            .execute(
                "INSERT INTO registries (id, workspace, name, created_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    registry.id,
                    registry.workspace,
                    registry.name,
                    registry.created_at as i64,
                    json
                ],
            )
            .map_err(|e| registry_name_taken(e, &registry.name))?;
        Ok(())
    }

    pub fn update_registry(&self, registry: &RegistryRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(registry)?;
        self.conn()
            .execute(
                "UPDATE registries SET name = ?2, record = ?3 WHERE id = ?1",
                params![registry.id, registry.name, json],
            )
            .map_err(|e| registry_name_taken(e, &registry.name))?;
        Ok(())
    }

    pub fn delete_registry(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM registries WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// A workspace's registry by name, else by id.
    pub fn find_registry(
        &self,
        workspace: &str,
        key: &str,
    ) -> Result<Option<RegistryRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM registries WHERE workspace = ?1 AND (name = ?2 OR id = ?2)
             ORDER BY name = ?2 DESC LIMIT 1",
            params![workspace, key],
        )
    }

    /// A workspace's registries, newest first.
    pub fn list_registries(&self, workspace: &str) -> Result<Vec<RegistryRecord>, StoreError> {
        records(
            &self.conn(),
            "SELECT record FROM registries WHERE workspace = ?1 ORDER BY created_at DESC, id DESC",
            params![workspace],
        )
    }
}

fn registry_name_taken(error: rusqlite::Error, name: &str) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => {
            StoreError::RegistryNameTaken(name.to_string())
        }
        _ => StoreError::Sqlite(error),
    }
}
