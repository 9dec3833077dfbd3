//! `ota-depot`: the fleet's update depot on an air-gapped network. It keeps verified bundles
//! and signed rollout plans, offers each device the bundle when its wave opens, records the
//! devices' signed reports, and halts a rollout whose error gate trips.
//!
//! Trusted for scheduling, never for integrity: it verifies what it keeps, but a device checks
//! everything again against its own release keys; a depot can delay or withhold an update,
//! never make a device install what the release keys did not sign.
//!
//! - [`gates`]: the pure decisions (wave assignment, gates), no I/O;
//! - [`store`]: the storage interface and its SQLite implementation;
//! - [`depot`]: the state and its verbs, writing through to the store;
//! - [`server`] and [`page`]: HTTP and the status page;
//! - [`cli`]: the command line (`serve`, and the operator's `publish`, `status`, `halt`,
//!   `resume`, `abort`).

pub mod cli;
pub mod depot;
pub mod gates;
pub mod page;
pub mod server;
pub mod store;
