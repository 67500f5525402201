//! Workspace templates (spec §2.8).

use rusqlite::params;

use super::{record, records, Store, StoreError};
use crate::templates::TemplateRecord;

impl Store {
    pub fn insert_template(&self, template: &TemplateRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(template)?;
        self.conn()
            .execute(
                "INSERT INTO templates (id, workspace, name, created_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    template.id,
                    template.workspace,
                    template.name,
                    template.created_at as i64,
                    json
                ],
            )
            .map_err(|e| super::name_taken(e, &template.name))?;
        Ok(())
    }

    pub fn update_template(&self, template: &TemplateRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(template)?;
        self.conn()
            .execute(
                "UPDATE templates SET name = ?2, record = ?3 WHERE id = ?1",
                params![template.id, template.name, json],
            )
            .map_err(|e| super::name_taken(e, &template.name))?;
        Ok(())
    }

    /// Deletes the template unless a pool or a sandbox made from it refers to it; `false` when
    /// one does. One statement, so no create or pool can slip in between check and delete.
    pub fn delete_unused_template(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let deleted = conn.execute(
            "DELETE FROM templates WHERE id = ?1
             AND NOT EXISTS (SELECT 1 FROM pools WHERE template_id = ?1)
             AND NOT EXISTS (SELECT 1 FROM sandboxes
                             WHERE json_extract(record, '$.template_id') = ?1)",
            params![id],
        )?;
        Ok(deleted > 0)
    }

    pub fn template_by_name(
        &self,
        workspace: &str,
        name: &str,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM templates WHERE workspace = ?1 AND name = ?2",
            params![workspace, name],
        )
    }

    pub fn template_by_id(&self, id: &str) -> Result<Option<TemplateRecord>, StoreError> {
        record(
            &self.conn(),
            "SELECT record FROM templates WHERE id = ?1",
            params![id],
        )
    }

    /// A workspace's templates, oldest first.
    pub fn list_templates(&self, workspace: &str) -> Result<Vec<TemplateRecord>, StoreError> {
        records(
            &self.conn(),
            "SELECT record FROM templates WHERE workspace = ?1 ORDER BY created_at, id",
            params![workspace],
        )
    }

    pub fn count_templates(&self, workspace: &str) -> Result<usize, StoreError> {
        let count: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM templates WHERE workspace = ?1",
            params![workspace],
            |row| row.get(0),
        )?;
        Ok(count as usize)
    }
}
