//! Workspace integration tests: several processes against one database, abrupt kills.

mod store;
