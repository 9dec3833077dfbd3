//! Shared state of one replica: its name, the database once open, and whether it drains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use quote_store::{Database, Store};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

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
    db: OnceLock<Db>,
    draining: AtomicBool,
    metrics: Metrics,
}

impl AppState {
    /// A replica without a database yet: it answers liveness, and 503 to everything else.
    pub fn new(instance: impl Into<String>, admin_token: Option<AdminToken>) -> Self {
        AppState(Arc::new(Inner {
            instance: instance.into(),
            admin_token,
            db: OnceLock::new(),
            draining: AtomicBool::new(false),
            metrics: Metrics::default(),
        }))
    }

    /// Makes the replica ready: `connections` is how many queries may run at once.
    /// Only the first call takes effect.
    pub fn attach_database(&self, database: Database, connections: usize) {
        let _ = self.0.db.set(Db {
            database: Arc::new(database),
            idle: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(connections.max(1))),
            writer: Arc::new(Semaphore::new(1)),
        });
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

    pub(crate) fn db(&self) -> Option<&Db> {
        self.0.db.get()
    }

    pub(crate) fn admin_token(&self) -> Option<&AdminToken> {
        self.0.admin_token.as_ref()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Runs the read `f` on a pooled connection on the blocking pool, or 503 if the database
    /// is not open.
    pub(crate) async fn with_store<T, F>(&self, f: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, quote_store::Error> + Send + 'static,
    {
        self.run(Access::Read, f).await
    }

    /// Like [`Self::with_store`] for a write: writes of this process queue here, in order,
    /// instead of competing for SQLite's file lock, whose busy handler sleeps and retries.
    /// Other processes' writers still wait on the busy timeout.
    pub(crate) async fn with_writer<T, F>(&self, f: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, quote_store::Error> + Send + 'static,
    {
        self.run(Access::Write, f).await
    }

    async fn run<T, F>(&self, access: Access, f: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, quote_store::Error> + Send + 'static,
    {
        let db = self
            .db()
            .ok_or(AppError::Unavailable("the database is not open yet"))?;
        let result = db.run(access, f).await;
        if let Err(AppError::Store(_)) = &result {
            self.metrics().db_error();
        }
        result
    }
}

#[derive(Debug, Clone, Copy)]
enum Access {
    Read,
    Write,
}

/// A small connection pool: SQLite connections are not shared between threads, so each
/// query borrows one, and the semaphore bounds how many run at once. Writes also hold the
/// single writer permit.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    database: Arc<Database>,
    idle: Arc<Mutex<Vec<Store>>>,
    permits: Arc<Semaphore>,
    writer: Arc<Semaphore>,
}

impl Db {
    async fn run<T, F>(&self, access: Access, f: F) -> Result<T, AppError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, quote_store::Error> + Send + 'static,
    {
        let write_permit = match access {
            Access::Write => Some(
                Arc::clone(&self.writer)
                    .acquire_owned()
                    .await
                    .map_err(|_| AppError::Unavailable("the database is closing"))?,
            ),
            Access::Read => None,
        };
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| AppError::Unavailable("the database is closing"))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permits = (permit, write_permit);
            let pooled = this.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut store = match pooled {
                Some(store) => store,
                None => this.database.connect()?,
            };
            let result = f(&mut store);
            this.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(store);
            result
        })
        .await
        .map_err(|join| AppError::Internal(format!("database task failed: {join}")))?
        .map_err(AppError::from)
    }
}
