//! Shared state of one replica: its name, the storage once open, whether the database
//! answers, and whether the replica drains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use quote_store::{Database, Storage};
use subtle::ConstantTimeEq;

use crate::error::AppError;
use crate::metrics::Metrics;

/// The bearer token that write requests must present.
pub struct AdminToken(Vec<u8>);

impl AdminToken {
    /// `None` for an empty token, which would let anyone in.
    pub fn new(token: &str) -> Option<Self> {
        (!token.is_empty()).then(|| AdminToken(token.as_bytes().to_vec()))
    }

    /// Constant-time in the token's content, so response timing does not reveal a prefix.
    pub(crate) fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Cheap to clone; every handler gets one.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    instance: String,
    admin_token: Option<AdminToken>,
    storage: OnceLock<Storage>,
    /// False while a remote database does not answer (see `server::watch_database`).
    reachable: AtomicBool,
    draining: AtomicBool,
    metrics: Metrics,
}

impl AppState {
    /// A replica without a database yet: it answers liveness, and 503 to everything else.
    pub fn new(instance: impl Into<String>, admin_token: Option<AdminToken>) -> Self {
        AppState(Arc::new(Inner {
            instance: instance.into(),
            admin_token,
            storage: OnceLock::new(),
            reachable: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            metrics: Metrics::default(),
        }))
    }

    /// Makes the replica ready on a SQLite database: `connections` is how many queries may
    /// run at once. Only the first attach takes effect.
    pub fn attach_database(&self, database: Database, connections: usize) {
        self.attach_storage(Storage::sqlite(database, connections));
    }

    /// Makes the replica ready on `storage`, whichever backend. Only the first attach takes
    /// effect.
    pub fn attach_storage(&self, storage: Storage) {
        let _ = self.0.storage.set(storage);
    }

    /// Readiness turns false from here on; requests already accepted still complete.
    pub fn start_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    pub fn instance(&self) -> &str {
        &self.0.instance
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// Whether the database answered its last check (always true for an embedded one).
    pub(crate) fn is_reachable(&self) -> bool {
        self.0.reachable.load(Ordering::SeqCst)
    }

    /// Records the outcome of a reachability check; returns the previous value.
    pub(crate) fn set_reachable(&self, reachable: bool) -> bool {
        self.0.reachable.swap(reachable, Ordering::SeqCst)
    }

    pub(crate) fn storage(&self) -> Option<&Storage> {
        self.0.storage.get()
    }

    pub(crate) fn admin_token(&self) -> Option<&AdminToken> {
        self.0.admin_token.as_ref()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Runs `f` against the storage, or answers 503 if it is not open yet. A failure is
    /// counted; an unreachable database also turns readiness off at once (the watcher turns
    /// it back on when the database answers again).
    pub(crate) async fn query<T, F, Fut>(&self, f: F) -> Result<T, AppError>
    where
        F: FnOnce(Storage) -> Fut,
        Fut: Future<Output = Result<T, quote_store::Error>>,
    {
        let storage = self
            .storage()
            .ok_or(AppError::Unavailable("the database is not open yet"))?
            .clone();
        let result = f(storage).await;
        if let Err(error) = &result {
            self.metrics().db_error();
            if error.is_unreachable() {
                self.set_reachable(false);
            }
        }
        result.map_err(AppError::from)
    }
}
