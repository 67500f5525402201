//! The backend-neutral part of a sandbox's life on the host: its directory under
//! `sandboxes/<id>/`, its claim on a uid/gid range and its `state.json` record. The namespace
//! and microVM backends share it; each adds its own writable layer and launch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cgroup::Cgroups;
use crate::error::{IoContext, RuntimeError};
use crate::namespace::store::{IdRegistry, Record, SandboxDir};
use crate::{SandboxSpec, SandboxState};

/// Fails unless every layer of the spec is an existing directory.
pub(crate) fn check_layers_are_dirs(spec: &SandboxSpec) -> Result<(), RuntimeError> {
    for layer in &spec.layers {
        if !std::fs::metadata(layer)
            .context(|| format!("layer {}", layer.display()))?
            .is_dir()
        {
            return Err(RuntimeError::InvalidSpec(format!(
                "layer {} is not a directory",
                layer.display()
            )));
        }
    }
    Ok(())
}

/// Creates a new sandbox's directory, claims its id range and saves its spec and a fresh
/// record. On error nothing of it is left behind.
pub(crate) fn claim_sandbox_dir(
    sandboxes: &Path,
    cgroups: &Cgroups,
    ids: &IdRegistry,
    spec: &SandboxSpec,
) -> Result<(SandboxDir, Record), RuntimeError> {
    if cgroups.is_populated(&spec.id) {
        // Another runtime on this host (another state dir) has a live sandbox by this id.
        return Err(RuntimeError::AlreadyExists(spec.id.clone()));
    }
    let dir = SandboxDir::create(sandboxes, &spec.id)?;
    let id_base = match ids.claim(dir.path()) {
        Ok(base) => base,
        Err(error) => {
            dir.remove_all();
            return Err(error);
        }
    };
    let record = Record {
        id_base,
        running: None,
        failed: None,
        started: false,
    };
    if let Err(error) = save_spec_and_record(&dir, spec, &record) {
        abandon_sandbox_dir(dir, ids, id_base);
        return Err(error);
    }
    Ok((dir, record))
}

fn save_spec_and_record(
    dir: &SandboxDir,
    spec: &SandboxSpec,
    record: &Record,
) -> Result<(), RuntimeError> {
    dir.save_spec(spec)?;
    dir.save_record(record)
}

/// Undoes [`claim_sandbox_dir`] when a sandbox's creation fails after it.
pub(crate) fn abandon_sandbox_dir(dir: SandboxDir, ids: &IdRegistry, id_base: u32) {
    ids.release(id_base, dir.path());
    dir.remove_all();
}

/// The state a record stands for.
pub(crate) fn state_of(record: &Record) -> SandboxState {
    match (&record.running, &record.failed) {
        (Some(running), _) => SandboxState::Running { pid: running.pid },
        (None, Some(message)) => SandboxState::Failed(message.clone()),
        (None, None) if record.started => SandboxState::Stopped,
        (None, None) => SandboxState::Created,
    }
}

/// The error for an `action` the sandbox's present state does not allow.
pub(crate) fn wrong_state(id: &str, record: &Record, action: &'static str) -> RuntimeError {
    RuntimeError::WrongState {
        id: id.to_string(),
        state: state_name(record),
        action,
    }
}

fn state_name(record: &Record) -> String {
    match state_of(record) {
        SandboxState::Created => "created",
        SandboxState::Running { .. } => "running",
        SandboxState::Stopped => "stopped",
        SandboxState::Failed(_) => "failed",
    }
    .to_string()
}

/// Settles a record for a stop: a sandbox that never ran stays Created; one that ran or
/// failed becomes Stopped.
pub(crate) fn settle_for_stop(record: &mut Record) {
    record.started |= record.running.is_some() || record.failed.is_some();
    record.failed = None;
}

/// The sandboxes this process knows, by id; each slot's own lock serialises its lifecycle.
pub(crate) struct SlotTable<S>(Mutex<HashMap<String, Arc<S>>>);

impl<S> SlotTable<S> {
    pub(crate) fn new() -> SlotTable<S> {
        SlotTable(Mutex::new(HashMap::new()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<S>>> {
        self.0.lock().expect("slots lock")
    }

    /// The slot of sandbox `id`, after checking the id's syntax.
    pub(crate) fn get(&self, id: &str) -> Result<Arc<S>, RuntimeError> {
        crate::validate_id(id)?;
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub(crate) fn insert(&self, id: String, slot: Arc<S>) {
        self.lock().insert(id, slot);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
}
