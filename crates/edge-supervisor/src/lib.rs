//! edge-supervisor: the kubelet and the Service of the device.

pub mod backoff;
pub mod config;
pub mod model;
