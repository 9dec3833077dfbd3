//! The quote HTTP API over [`quote_store`], as one replica of the quote-edge stack.
//!
//! [`app`] builds the router (tests drive it with `oneshot`, no socket); [`serve`] runs it on a
//! listener until a shutdown signal, then drains. The binary is a thin shim over these
//! pieces: [`Cli`] → [`Settings`] → [`run`].
//!
//! Architecture invariant: every response carries `X-Served-By`, and nothing is written
//! for a request that is refused.

mod api;
mod config;
mod error;
mod health;
mod metrics;
mod server;
mod state;

pub use api::{BODY_LIMIT, app};
pub use config::{Cli, Command, ConfigError, Settings};
pub use error::AppError;
pub use server::{RunError, run, serve, shutdown_signal};
pub use state::{AdminToken, AppState};

/// The version this binary reports. A release build may stamp it with `QUOTE_EDGE_VERSION`
/// (the OTA bundle's version); otherwise it is the crate version.
pub const VERSION: &str = match option_env!("QUOTE_EDGE_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Process exit codes of `quote-service`, chosen so a supervisor can tell a bad
/// configuration or a bad database (restarting will not help) from a crash.
pub mod exit {
    /// Clean shutdown.
    pub const OK: i32 = 0;
    /// An unexpected runtime failure.
    pub const FAILURE: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The database is corrupt or newer than this build (`EX_DATAERR`).
    pub const DATA: i32 = 65;
    /// The listen address or the database could not be opened (`EX_IOERR`).
    pub const IO: i32 = 74;
    /// Bad configuration, such as an unreadable or empty token file (`EX_CONFIG`).
    pub const CONFIG: i32 = 78;
}
