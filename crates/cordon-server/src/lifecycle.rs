//! The lifecycle task: stops idle sandboxes and deletes long-stopped ones (spec §2.1.1 TTLs).

use std::sync::Arc;
use std::time::Duration;

use crate::model::{now_ms, Status};
use crate::sandboxes::Sandboxes;

/// Runs forever, checking every `tick`.
pub async fn run(sandboxes: Arc<Sandboxes>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(error) = enforce_ttls(&sandboxes).await {
            tracing::warn!(%error, "lifecycle pass failed");
        }
    }
}

async fn enforce_ttls(sandboxes: &Arc<Sandboxes>) -> Result<(), crate::store::StoreError> {
    let now = now_ms();
    for record in sandboxes.store.list(None)? {
        if record.status == Status::Ready {
            // Keep `status` truthful when a sandbox died on its own.
            sandboxes.notice_if_dead(&record.id).await;
        }
        match record.status {
            Status::Ready
                if record.idle_ttl_seconds > 0
                    && sandboxes.idle_for(&record.id)
                        >= Duration::from_secs(record.idle_ttl_seconds) =>
            {
                tracing::info!(sandbox = %record.id, "stopping idle sandbox");
                sandboxes.stop(&record.id).await;
            }
            Status::Stopped | Status::Failed if record.delete_after_stop_seconds > 0 => {
                let stopped = record.stopped_at.unwrap_or(record.updated_at);
                let limit = record.delete_after_stop_seconds.saturating_mul(1000);
                if now.saturating_sub(stopped) >= limit {
                    tracing::info!(sandbox = %record.id, "deleting long-stopped sandbox");
                    if let Err(error) = sandboxes.delete(&record.id) {
                        tracing::warn!(sandbox = %record.id, %error, "deleting");
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
