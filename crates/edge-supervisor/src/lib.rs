//! edge-supervisor: the kubelet and the Service of the device.
//!
//! What other crates use is public: the CLI (`cli`, the binary's shim), the configuration
//! (`config`), the control socket's client for async callers (`control::request`, over
//! `edge_proto::client`) and the supervisor itself (`supervisor::Bound`). The rest is the
//! supervisor's own business.

pub mod cli;
pub mod config;
pub mod control;
mod limits;
mod metrics;
mod probe;
mod process;
mod proxy;
mod ready;
pub mod supervisor;
mod watchdog;
