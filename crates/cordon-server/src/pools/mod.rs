//! Warm pools (spec §2.8 and extensions): each pool keeps sandboxes of one template created,
//! started and unclaimed, so that a create it can serve gets one at once.
//!
//! A warm sandbox is an ordinary sandbox row in the pool's hidden workspace
//! (`pool:<pool id>`): no API key maps to that workspace, so it is invisible to every list,
//! lookup and data-plane request until it is claimed, and the server re-adopts it after a
//! restart like any sandbox. Claiming moves the row into the tenant's workspace with one
//! conditional `UPDATE` (it only succeeds while the row is still in the pool's workspace), so
//! a warm sandbox is never handed out twice. Its id (and so its `dataplane_url`) was never
//! shown to anyone before the claim; name, labels and TTLs are set at the claim and
//! `created_at` is the claim time. A background pass keeps each pool at its target, which
//! follows demand (see [`scaling`]) within the host budget.

pub mod routes;
pub mod scaling;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cordon_api::RunConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::control::CreateRequest;
use crate::error::ApiError;
use crate::model::{iso8601, now_ms, SandboxBase, SandboxRecord, Status};
use crate::sandboxes::Sandboxes;
use crate::snapshots::Snapshots;
use crate::store::{Store, StoreError};
use crate::templates::TemplateRecord;
use scaling::Bounds;

/// Scaling decisions kept per pool for `GET /pools/{name}`.
const DECISIONS_KEPT: usize = 20;
/// Claims remembered per pool for the demand window.
const DEMAND_KEPT: usize = 10_000;
/// Most warm sandboxes one pass starts per pool, so a refill never floods the host at once.
const MAX_STARTS_PER_PASS: u32 = 16;
/// Create fields that make a sandbox differ from its template's warm ones.
const PER_SANDBOX_FIELDS: &[&str] = &[
    "runtime",
    "run_config",
    "proxy_config",
    "mount_config",
    "mounts",
    "access_delegation",
    "env_vars",
    "volumes",
    "restore_memory",
    "preserve_memory_on_stop",
];

/// How pools are run (`--pool-*` flags).
#[derive(Debug, Clone)]
pub struct PoolsConfig {
    /// How often the pools are checked and refilled (claims also wake the pass).
    pub tick: Duration,
    /// The demand window: a pool's target is the claims within it plus its spare target.
    pub demand_window: Duration,
    /// How long a pool goes without demand before its target shrinks.
    pub scale_down_cooldown: Duration,
    /// Most memory all warm sandboxes together may be given (`None`: unbounded).
    pub memory_budget_bytes: Option<u64>,
    /// Most CPU all warm sandboxes together may be given, in millicores.
    pub cpu_budget_millicores: Option<u64>,
}

impl Default for PoolsConfig {
    fn default() -> Self {
        PoolsConfig {
            tick: Duration::from_secs(2),
            demand_window: Duration::from_secs(60),
            scale_down_cooldown: Duration::from_secs(300),
            memory_budget_bytes: None,
            cpu_budget_millicores: None,
        }
    }
}

/// One pool as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub id: String,
    pub workspace: String,
    pub name: String,
    pub template_id: String,
    /// The spec's size; the floor (and, without `max_replicas`, the ceiling).
    pub replicas: u32,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub target_spare: u32,
    pub created_at: u64,
    pub updated_at: u64,
}

impl PoolRecord {
    pub fn bounds(&self) -> Bounds {
        let min = self.min_replicas.unwrap_or(self.replicas);
        Bounds {
            min,
            max: self.max_replicas.unwrap_or(self.replicas.max(min)),
            spare: self.target_spare,
        }
    }
}

/// The hidden workspace holding a pool's warm sandboxes. Tenant workspaces are hex digests,
/// so this can never be one.
pub fn pool_workspace(pool_id: &str) -> String {
    format!("pool:{pool_id}")
}

fn pool_id_of(workspace: &str) -> Option<&str> {
    workspace.strip_prefix("pool:")
}

/// What a pool's warm sandboxes are made of, resolved from its template at the last pass.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    snapshot_id: String,
    base: SandboxBase,
    cpu_millicores: Option<u32>,
    mem_bytes: Option<u64>,
    fs_capacity_bytes: Option<u64>,
    run_config: RunConfig,
    /// Whether creates that do not name the template may take its warm sandboxes.
    plain: bool,
}

impl Expected {
    fn matches(&self, record: &SandboxRecord) -> bool {
        record.snapshot_id == self.snapshot_id
            && record.cpu_millicores == self.cpu_millicores
            && record.mem_bytes == self.mem_bytes
            && record.fs_capacity_bytes == self.fs_capacity_bytes
            && record.run_config == self.run_config
            && record.base.as_ref() == Some(&self.base)
    }
}

impl Expected {
    /// Whether a create asking for `wanted` may get one of these: the same snapshot and
    /// run_config, and the same resources where it names any (a create that names none gets
    /// the template's).
    fn serves(&self, wanted: &SandboxRecord) -> bool {
        fn same_or_unset<T: PartialEq>(wanted: Option<T>, have: Option<T>) -> bool {
            wanted.is_none() || wanted == have
        }
        wanted.snapshot_id == self.snapshot_id
            && wanted.base.as_ref() == Some(&self.base)
            && wanted.run_config == self.run_config
            && same_or_unset(wanted.cpu_millicores, self.cpu_millicores)
            && same_or_unset(wanted.mem_bytes, self.mem_bytes)
            && same_or_unset(wanted.fs_capacity_bytes, self.fs_capacity_bytes)
    }
}

#[derive(Debug, Clone, Serialize)]
struct Decision {
    at: String,
    from: u32,
    to: u32,
    reason: String,
}

/// What the server remembers of a pool between passes (not persisted: demand restarts at
/// zero after a restart, and the target at its floor).
#[derive(Default)]
struct PoolState {
    demand: VecDeque<Instant>,
    claimed: u64,
    target: Option<u32>,
    last_activity: Option<Instant>,
    decisions: VecDeque<Decision>,
    /// The target after the budget and quota caps; what the pass fills to.
    goal: u32,
    cap: Option<String>,
    problem: Option<String>,
    expected: Option<Expected>,
    passes: u64,
}

impl PoolState {
    fn decide(&mut self, from: u32, to: u32, reason: String) {
        tracing::info!(from, to, %reason, "pool scaling");
        if self.decisions.len() == DECISIONS_KEPT {
            self.decisions.pop_front();
        }
        self.decisions.push_back(Decision {
            at: iso8601(now_ms()),
            from,
            to,
            reason,
        });
    }

    fn demand_in(&mut self, window: Duration) -> u32 {
        while self.demand.front().is_some_and(|t| t.elapsed() > window) {
            self.demand.pop_front();
        }
        self.demand.len() as u32
    }

    fn note_demand(&mut self) {
        if self.demand.len() == DEMAND_KEPT {
            self.demand.pop_front();
        }
        self.demand.push_back(Instant::now());
        self.last_activity = Some(Instant::now());
    }
}

/// A pool's sandbox counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub ready: usize,
    pub starting: usize,
}

pub struct Pools {
    store: Arc<Store>,
    sandboxes: Arc<Sandboxes>,
    snapshots: Arc<Snapshots>,
    config: PoolsConfig,
    max_sandboxes_per_workspace: usize,
    state: Mutex<HashMap<String, PoolState>>,
    /// Serialises choosing and claiming a warm sandbox (the store's conditional update is
    /// what guarantees a single owner; this only spares claimers from racing for the same).
    claiming: Mutex<()>,
    /// One pass at a time; a pool delete holds it so no pass refills a deleted pool.
    pass_lock: tokio::sync::Mutex<()>,
    wake: Notify,
    /// Woken after every pass, for creates that wait for a pool to fill.
    passed: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pools {
    pub fn new(
        store: Arc<Store>,
        sandboxes: Arc<Sandboxes>,
        snapshots: Arc<Snapshots>,
        config: PoolsConfig,
        max_sandboxes_per_workspace: usize,
    ) -> Pools {
        Pools {
            store,
            sandboxes,
            snapshots,
            config,
            max_sandboxes_per_workspace,
            state: Mutex::default(),
            claiming: Mutex::default(),
            pass_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            passed: Notify::new(),
        }
    }

    /// Asks for a pass now (a claim, a pool or template change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs the passes for the life of the server.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "pool pass failed");
            }
            self.passed.notify_waiters();
            tokio::select! {
                () = tokio::time::sleep(self.config.tick) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Warm sandboxes the workspace's pools hold (they count against its sandbox limit).
    pub fn warm_count(&self, workspace: &str) -> Result<usize, ApiError> {
        let mut count = 0;
        for pool in self.store.list_pools(Some(workspace))? {
            count += self.store.list(Some(&pool_workspace(&pool.id)))?.len();
        }
        Ok(count)
    }

    pub fn counts(&self, pool: &PoolRecord) -> Result<Counts, ApiError> {
        let mut counts = Counts::default();
        for record in self.store.list(Some(&pool_workspace(&pool.id)))? {
            match record.status {
                Status::Ready => counts.ready += 1,
                Status::Provisioning => counts.starting += 1,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// The Pool object of spec §2.8 plus its state.
    pub fn to_json(&self, pool: &PoolRecord, template_name: &str) -> Result<Value, ApiError> {
        let counts = self.counts(pool)?;
        let bounds = pool.bounds();
        let mut state = lock(&self.state);
        let state = state.entry(pool.id.clone()).or_default();
        let demand = state.demand_in(self.config.demand_window);
        Ok(json!({
            "id": pool.id,
            "name": pool.name,
            "template_name": template_name,
            "replicas": pool.replicas,
            "min_replicas": bounds.min,
            "max_replicas": bounds.max,
            "target_spare": pool.target_spare,
            "target": state.target.unwrap_or(bounds.min),
            "ready": counts.ready,
            "starting": counts.starting,
            "claimed": state.claimed,
            "demand_in_window": demand,
            "demand_window_seconds": self.config.demand_window.as_secs(),
            "capped_by": state.cap,
            "status_message": state.problem,
            "decisions": state.decisions,
            "created_at": iso8601(pool.created_at),
            "updated_at": iso8601(pool.updated_at),
        }))
    }

    /// Waits until the pool holds its (capped) goal of ready sandboxes; `false` on timeout.
    pub async fn wait_filled(&self, pool: &PoolRecord, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let passed = self.passed.notified();
            let filled = {
                let state = lock(&self.state);
                state.get(&pool.id).map(|s| (s.passes, s.goal))
            };
            if let Some((passes, goal)) = filled {
                if passes > 0
                    && self
                        .counts(pool)
                        .is_ok_and(|counts| counts.ready >= goal as usize)
                {
                    return true;
                }
            }
            self.wake();
            if tokio::time::timeout_at(deadline, passed).await.is_err() {
                return false;
            }
        }
    }

    /// Forgets the pool and deletes its warm sandboxes.
    pub async fn delete(&self, pool: &PoolRecord) -> Result<(), ApiError> {
        let _pass = self.pass_lock.lock().await;
        self.store.delete_pool(&pool.id)?;
        for record in self.store.list(Some(&pool_workspace(&pool.id)))? {
            self.retire_warm(&record)?;
        }
        lock(&self.state).remove(&pool.id);
        tracing::info!(pool = %pool.id, name = %pool.name, "pool deleted");
        Ok(())
    }

    /// Deletes a warm sandbox unless a claim took it since it was listed: the check and the
    /// delete happen under the claim lock, so a claimed sandbox is never deleted by its pool.
    fn retire_warm(&self, listed: &SandboxRecord) -> Result<(), ApiError> {
        let _claiming = lock(&self.claiming);
        // The workspace column, which only a claim changes (a status write rewrites the JSON).
        match self.store.sandbox_workspace(&listed.id)? {
            Some(workspace) if workspace == listed.workspace => self.sandboxes.delete(&listed.id),
            _ => Ok(()),
        }
    }

    /// Hands the creator a warm sandbox if one of its workspace's pools can serve the
    /// request: the same template, or (for a template with no sandbox settings of its own)
    /// the same snapshot and resources; and nothing per-sandbox in the body.
    pub fn try_claim(
        &self,
        workspace: &str,
        request: &CreateRequest,
        template: Option<&TemplateRecord>,
        body: &Map<String, Value>,
    ) -> Result<Option<SandboxRecord>, ApiError> {
        let per_sandbox = PER_SANDBOX_FIELDS
            .iter()
            .any(|field| body.get(*field).is_some_and(|v| !v.is_null()));
        if per_sandbox {
            return Ok(None);
        }
        for pool in self.store.list_pools(Some(workspace))? {
            if !self.serves(&pool, request, template) {
                continue;
            }
            lock(&self.state)
                .entry(pool.id.clone())
                .or_default()
                .note_demand();
            let claimed = self.claim_from(&pool, request)?;
            self.wake();
            if let Some(record) = claimed {
                lock(&self.state)
                    .entry(pool.id.clone())
                    .or_default()
                    .claimed += 1;
                tracing::info!(pool = %pool.name, sandbox = %record.id, name = %record.name,
                    "served a create from the pool");
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    fn serves(
        &self,
        pool: &PoolRecord,
        request: &CreateRequest,
        template: Option<&TemplateRecord>,
    ) -> bool {
        let state = lock(&self.state);
        let Some(expected) = state.get(&pool.id).and_then(|s| s.expected.as_ref()) else {
            return false;
        };
        let same_template = template.is_some_and(|t| t.id == pool.template_id);
        (same_template || (template.is_none() && expected.plain))
            && expected.serves(&request.record)
    }

    /// Claims the pool's oldest ready warm sandbox that matches the request.
    fn claim_from(
        &self,
        pool: &PoolRecord,
        request: &CreateRequest,
    ) -> Result<Option<SandboxRecord>, ApiError> {
        let _claiming = lock(&self.claiming);
        let hidden = pool_workspace(&pool.id);
        let expected = lock(&self.state)
            .get(&pool.id)
            .and_then(|s| s.expected.clone());
        let Some(expected) = expected else {
            return Ok(None);
        };
        for warm in self.store.list(Some(&hidden))? {
            if warm.status != Status::Ready || !expected.matches(&warm) {
                continue;
            }
            if let Some(claimed) =
                self.claim_with_name(&hidden, claimed_record(warm, request), request)?
            {
                self.sandboxes.touch(&claimed.id);
                return Ok(Some(claimed));
            }
        }
        Ok(None)
    }

    /// Claims under the requested name, or a generated `sandbox-<8 hex>`.
    fn claim_with_name(
        &self,
        hidden: &str,
        mut claimed: SandboxRecord,
        request: &CreateRequest,
    ) -> Result<Option<SandboxRecord>, ApiError> {
        if let Some(name) = &request.name {
            claimed.name = name.clone();
            let won = self.store.claim_warm_sandbox(hidden, &claimed)?;
            return Ok(won.then_some(claimed));
        }
        for _ in 0..8 {
            claimed.name = generated_name();
            match self.store.claim_warm_sandbox(hidden, &claimed) {
                Err(StoreError::NameTaken(_)) => continue,
                other => return Ok(other?.then_some(claimed)),
            }
        }
        Err(ApiError::Internal("could not generate a free name".into()))
    }

    /// One pass over every pool: drop dead, stale and orphaned warm sandboxes, move targets
    /// with demand, and fill up to the target within the budget and the workspace limits.
    async fn pass(&self) -> Result<(), ApiError> {
        let _pass = self.pass_lock.lock().await;
        let pools = self.store.list_pools(None)?;
        let mut warm: HashMap<String, Vec<SandboxRecord>> = HashMap::new();
        let mut held: HashMap<String, usize> = HashMap::new();
        for record in self.store.list(None)? {
            match pool_id_of(&record.workspace) {
                Some(pool_id) => warm.entry(pool_id.to_string()).or_default().push(record),
                None => *held.entry(record.workspace.clone()).or_default() += 1,
            }
        }
        for (pool_id, records) in &warm {
            if !pools.iter().any(|p| &p.id == pool_id) {
                for record in records {
                    tracing::info!(sandbox = %record.id, "deleting a warm sandbox of a deleted pool");
                    self.retire_warm(record)?;
                }
            }
        }
        let mut ledger = Ledger {
            memory: 0,
            cpu: 0,
            held,
        };
        for pool in &pools {
            let live: Vec<&SandboxRecord> = warm
                .get(&pool.id)
                .into_iter()
                .flatten()
                .filter(|r| matches!(r.status, Status::Ready | Status::Provisioning))
                .collect();
            for record in &live {
                ledger.add(&pool.workspace, record);
            }
        }
        for pool in &pools {
            let records = warm.remove(&pool.id).unwrap_or_default();
            if let Err(error) = self.tend(pool, records, &mut ledger).await {
                tracing::warn!(pool = %pool.name, %error, "tending pool");
            }
        }
        Ok(())
    }

    fn resolve(&self, pool: &PoolRecord) -> Result<Expected, String> {
        let template = self
            .store
            .template_by_id(&pool.template_id)
            .map_err(|e| e.to_string())?
            .ok_or("its template is gone")?;
        let found = self
            .snapshots
            .find_or_404(&pool.workspace, template.snapshot_reference())
            .map_err(|e| e.to_string())?;
        let (snapshot_id, base, default_fs) = self
            .snapshots
            .sandbox_base(found, template.snapshot_reference())
            .map_err(|e| e.to_string())?;
        Ok(Expected {
            snapshot_id,
            base,
            cpu_millicores: Some(template.resources.cpu_millicores),
            mem_bytes: Some(template.resources.mem_bytes),
            fs_capacity_bytes: template.resources.fs_capacity_bytes.or(default_fs),
            run_config: template.run_config.clone().unwrap_or_default(),
            plain: !template.has_sandbox_settings(),
        })
    }

    async fn tend(
        &self,
        pool: &PoolRecord,
        records: Vec<SandboxRecord>,
        ledger: &mut Ledger,
    ) -> Result<(), ApiError> {
        let expected = match self.resolve(pool) {
            Ok(expected) => expected,
            Err(problem) => {
                let mut state = lock(&self.state);
                let state = state.entry(pool.id.clone()).or_default();
                state.problem = Some(format!("cannot make warm sandboxes: {problem}"));
                state.expected = None;
                state.passes += 1;
                return Ok(());
            }
        };
        let mut live = Vec::new();
        for record in records {
            let alive = matches!(record.status, Status::Ready | Status::Provisioning);
            if alive && expected.matches(&record) {
                live.push(record);
                continue;
            }
            if alive {
                ledger.remove(&pool.workspace, &record);
            }
            tracing::info!(pool = %pool.name, sandbox = %record.id, status = record.status.as_str(),
                "replacing a dead or outdated warm sandbox");
            self.retire_warm(&record)?;
        }
        let (target, goal) = self.plan(pool, &expected, live.len(), ledger);
        if live.len() > target as usize {
            // Oldest ready first: all are clean, and the newest have the most life left.
            let surplus = live.len() - target as usize;
            live.sort_by_key(|r| (r.status != Status::Ready, r.created_at));
            for record in live.drain(..surplus) {
                ledger.remove(&pool.workspace, &record);
                self.retire_warm(&record)?;
            }
        }
        let starts = goal
            .saturating_sub(live.len() as u32)
            .min(MAX_STARTS_PER_PASS);
        for _ in 0..starts {
            let record = self.start_warm(pool, &expected).await?;
            ledger.add(&pool.workspace, &record);
        }
        Ok(())
    }

    /// Moves the pool's target with demand and caps what can be filled now by the budget and
    /// the workspace's limit: (target, goal).
    fn plan(
        &self,
        pool: &PoolRecord,
        expected: &Expected,
        live: usize,
        ledger: &Ledger,
    ) -> (u32, u32) {
        let bounds = pool.bounds();
        let cfg = &self.config;
        let mut states = lock(&self.state);
        let state = states.entry(pool.id.clone()).or_default();
        state.problem = None;
        state.expected = Some(expected.clone());
        state.passes += 1;
        let demand = state.demand_in(cfg.demand_window);
        let current = *state
            .target
            .get_or_insert_with(|| scaling::desired(bounds, 0));
        let quiet_for = state.last_activity.map_or(Duration::MAX, |at| at.elapsed());
        if let Some(change) = scaling::next_target(
            bounds,
            current,
            demand,
            cfg.demand_window,
            quiet_for,
            cfg.scale_down_cooldown,
        ) {
            state.decide(current, change.to, change.reason);
            state.target = Some(change.to);
            state.last_activity = Some(Instant::now());
        }
        let target = state.target.unwrap_or(bounds.min);
        let (room, cap) = self.room(pool, expected, ledger);
        let goal = target.min((live as u64).saturating_add(room).min(u32::MAX as u64) as u32);
        let cap = (goal < target).then(|| format!("{cap}: holding {goal} of target {target}"));
        if cap != state.cap {
            if let Some(reason) = &cap {
                state.decide(target, goal, format!("capped by {reason}"));
            }
            state.cap = cap;
        }
        state.goal = goal;
        (target, goal)
    }

    /// How many more warm sandboxes of this pool fit, and what limits that.
    fn room(&self, pool: &PoolRecord, expected: &Expected, ledger: &Ledger) -> (u64, String) {
        let mut room = (u64::MAX, String::new());
        let mut limit = |fits: u64, what: String| {
            if fits < room.0 {
                room = (fits, what);
            }
        };
        if let (Some(budget), Some(each)) = (self.config.memory_budget_bytes, expected.mem_bytes) {
            limit(
                budget.saturating_sub(ledger.memory) / each.max(1),
                format!("the pool memory budget ({budget} bytes)"),
            );
        }
        if let (Some(budget), Some(each)) =
            (self.config.cpu_budget_millicores, expected.cpu_millicores)
        {
            limit(
                budget.saturating_sub(ledger.cpu) / u64::from(each.max(1)),
                format!("the pool cpu budget ({budget} millicores)"),
            );
        }
        let held = ledger.held.get(&pool.workspace).copied().unwrap_or(0);
        limit(
            self.max_sandboxes_per_workspace.saturating_sub(held) as u64,
            format!(
                "the workspace's sandbox count limit ({})",
                self.max_sandboxes_per_workspace
            ),
        );
        room
    }

    async fn start_warm(
        &self,
        pool: &PoolRecord,
        expected: &Expected,
    ) -> Result<SandboxRecord, ApiError> {
        let now = now_ms();
        let record = SandboxRecord {
            id: uuid::Uuid::new_v4().to_string(),
            workspace: pool_workspace(&pool.id),
            name: generated_name(),
            status: Status::Provisioning,
            status_message: None,
            snapshot_id: expected.snapshot_id.clone(),
            cpu_millicores: expected.cpu_millicores,
            mem_bytes: expected.mem_bytes,
            fs_capacity_bytes: expected.fs_capacity_bytes,
            // Warm sandboxes never idle out or expire; the pool retires them.
            idle_ttl_seconds: 0,
            delete_after_stop_seconds: 0,
            persistent: true,
            labels: Default::default(),
            access_delegation: None,
            run_config: expected.run_config.clone(),
            created_at: now,
            updated_at: now,
            stopped_at: None,
            base: Some(expected.base.clone()),
            // A claim names the template, if the create did.
            template_name: None,
            template_id: None,
            runtime: self.sandboxes.default_runtime,
            proxy_config: None,
        };
        let _claim = self.snapshots.claim_layers().await;
        self.sandboxes.create(&record)?;
        tracing::debug!(pool = %pool.name, sandbox = %record.id, "starting a warm sandbox");
        Ok(record)
    }
}

/// What the warm sandboxes hold: memory and CPU over all pools (for the host budget), and
/// sandboxes per tenant workspace, warm ones included (for its limit).
struct Ledger {
    memory: u64,
    cpu: u64,
    held: HashMap<String, usize>,
}

impl Ledger {
    fn add(&mut self, workspace: &str, record: &SandboxRecord) {
        self.memory = self.memory.saturating_add(record.mem_bytes.unwrap_or(0));
        self.cpu = self
            .cpu
            .saturating_add(u64::from(record.cpu_millicores.unwrap_or(0)));
        *self.held.entry(workspace.to_string()).or_default() += 1;
    }

    fn remove(&mut self, workspace: &str, record: &SandboxRecord) {
        self.memory = self.memory.saturating_sub(record.mem_bytes.unwrap_or(0));
        self.cpu = self
            .cpu
            .saturating_sub(u64::from(record.cpu_millicores.unwrap_or(0)));
        if let Some(held) = self.held.get_mut(workspace) {
            *held = held.saturating_sub(1);
        }
    }
}

fn generated_name() -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("sandbox-{}", &suffix[..8])
}

/// The warm sandbox as the creator gets it: theirs, named, labelled, with their TTLs and the
/// template they named.
fn claimed_record(warm: SandboxRecord, request: &CreateRequest) -> SandboxRecord {
    let now = now_ms();
    SandboxRecord {
        workspace: request.record.workspace.clone(),
        labels: request.record.labels.clone(),
        idle_ttl_seconds: request.record.idle_ttl_seconds,
        delete_after_stop_seconds: request.record.delete_after_stop_seconds,
        persistent: request.record.persistent,
        template_name: request.record.template_name.clone(),
        template_id: request.record.template_id.clone(),
        created_at: now,
        updated_at: now,
        ..warm
    }
}
