//! Workspace integration tests: several processes against one database, abrupt kills, and the
//! supervisor with real and fake replicas.

mod depot;
mod image;
mod ota;
mod powercut;
mod privilege;
mod store;
mod supervisor;
mod update;
