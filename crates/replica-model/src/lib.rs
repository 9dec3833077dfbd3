//! replica-model: the decisions of the device's kubelet, as a pure state machine. One slot per
//! replica: Waiting -> Spawning -> Starting (startup probe) -> Running (liveness, readiness) ->
//! Stopping; events in (a process started or exited, a probe result, a timer, scale, restart,
//! roll out or recreate a revision), `Action`s out (spawn, probe, signal, publish routes).
//! `model.md` has the diagram.
//!
//! Architecture invariant: no I/O, no clock and no randomness of its own (the time and the seed
//! are injected), so every transition is unit-tested without sleeping; edge-supervisor is the
//! driver that carries the actions out.

mod backoff;
mod model;
mod policy;

pub use model::*;
pub use policy::{Probe, ProbeAction, Probes, RestartPolicy};
