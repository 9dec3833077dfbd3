//! What the replica model is told: the probes (Kubernetes' startup, liveness and readiness,
//! validated) and the restart policy. The supervisor's configuration fills them in.

use std::num::NonZeroU32;
use std::time::Duration;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    Http { path: String },
    Tcp,
    Exec { command: Vec<String> },
}

/// A validated probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: NonZeroU32,
    pub failure_threshold: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probes {
    pub startup: Option<Probe>,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub jitter: f64,
    pub reset_after: Duration,
    pub budget: u32,
    pub budget_window: Duration,
}
