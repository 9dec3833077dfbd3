//! edge-supervisor: the kubelet and the Service of the device.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod supervisor;
pub mod watchdog;
