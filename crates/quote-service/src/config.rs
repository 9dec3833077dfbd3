//! Command line and environment, validated into [`Settings`].

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use quote_store::{Target, TargetError};

use crate::state::AdminToken;

/// quote-service: the quote API on an embedded SQLite database, or on a shared PostgreSQL one.
#[derive(Debug, Parser)]
#[command(name = "quote-service", version = crate::VERSION)]
pub struct Cli {
    /// Address to listen on (port 0 picks a free port; the log says which).
    #[arg(long, env = "QUOTE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// SQLite database file (its directory is created if missing), or a PostgreSQL URL
    /// `postgres://USER@HOST:PORT/DB?...` (libpq syntax).
    #[arg(long, env = "QUOTE_DB", default_value = "./data/quotes.db")]
    pub db: String,
    /// File holding the PostgreSQL password (a mounted Secret); overrides one in the URL.
    #[arg(long, env = "QUOTE_DB_PASSWORD_FILE")]
    pub db_password_file: Option<PathBuf>,
    /// Name reported in `X-Served-By` [default: <hostname>-<pid>].
    #[arg(long, env = "QUOTE_INSTANCE")]
    pub instance: Option<String>,
    /// File holding the bearer token that POST and DELETE require; reads stay open.
    #[arg(long, env = "QUOTE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    #[arg(long, env = "QUOTE_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Largest size the database may grow to, in bytes; writes past it get 507.
    #[arg(long, env = "QUOTE_DB_MAX_SIZE")]
    pub db_max_size: Option<u64>,
    /// Async worker threads (SQLite work runs on up to `db-connections` more).
    #[arg(long, env = "QUOTE_WORKER_THREADS", default_value = "2")]
    pub worker_threads: NonZeroUsize,
    /// Database connections kept open, and so the most queries running at once.
    #[arg(long, env = "QUOTE_DB_CONNECTIONS", default_value = "4")]
    pub db_connections: NonZeroUsize,
    /// Instead of serving: a database maintenance command (the OTA agent runs these).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Database maintenance, for updates: both work while replicas are serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Copy the database to FILE (one consistent read; FILE is replaced atomically).
    Snapshot {
        #[arg(long)]
        to: PathBuf,
    },
    /// Put a snapshot back in one transaction, after writing the quotes it lacks to EXPORT.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        export: PathBuf,
    },
}

/// Everything the service needs to start, already checked.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub db: Target,
    pub instance: String,
    pub admin_token: Option<AdminToken>,
    pub shutdown_grace: Duration,
    pub db_max_size: Option<u64>,
    pub worker_threads: NonZeroUsize,
    pub db_connections: NonZeroUsize,
}

/// A configuration that cannot work; the process exits with [`crate::exit::CONFIG`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the admin token file {path}: {source}")]
    TokenUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token file {path} is empty")]
    TokenEmpty { path: PathBuf },
    #[error("--instance must be 1 to 64 visible ASCII characters, got {0:?}")]
    BadInstance(String),
    #[error(transparent)]
    Database(#[from] TargetError),
}

impl Cli {
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let instance = match self.instance {
            Some(name) => name,
            None => format!("{}-{}", hostname(), std::process::id()),
        };
        if instance.is_empty()
            || instance.len() > 64
            || !instance.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::BadInstance(instance));
        }
        let admin_token = self
            .admin_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        let db = Target::parse(&self.db, self.db_password_file.as_deref())?;
        Ok(Settings {
            listen: self.listen,
            db,
            instance,
            admin_token,
            shutdown_grace: self.shutdown_grace,
            db_max_size: self.db_max_size,
            worker_threads: self.worker_threads,
            db_connections: self.db_connections,
        })
    }
}

fn read_token(path: &Path) -> Result<AdminToken, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenUnreadable {
        path: path.to_owned(),
        source,
    })?;
    AdminToken::new(text.trim()).ok_or_else(|| ConfigError::TokenEmpty {
        path: path.to_owned(),
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "quote".to_owned())
}
