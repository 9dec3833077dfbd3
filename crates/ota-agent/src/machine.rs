//! The update state machine, pure: events come in with the time they happened, actions go out.
//! No I/O, no clock of its own, no slot state: the driver ([`crate::Agent`]) reads and saves
//! the slot state, runs the blocking work the actions name, and feeds the results back as
//! events. Every transition, and every event that does not belong to the phase, is unit-tested
//! here without sleeping (`agent.md` has the diagram).
//!
//! An event that does not belong to the phase is refused with [`OutOfPhase`] and leaves the
//! phase exactly as it was: a stray result can never erase a trial or a rollback.

use std::time::{Duration, Instant};

use edge_proto::UpdateState;
use ota_slots::SlotName;

use crate::source::Offer;

/// The release an update is about: installed in `slot`, tried, then committed or rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub slot: SlotName,
    pub version: String,
    /// The bundle's issue time, for the anti-replay floor at commit; 0 when the trial was
    /// resumed after a restart (not in memory then).
    pub issued_at: u64,
    /// The bundle the release came from (for the receipt beside it); `None` after a restart.
    pub bundle: Option<Offer>,
}

/// What the agent is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Installing {
        bundle: Offer,
    },
    /// The running release is taking the database snapshot.
    Snapshotting {
        target: Target,
    },
    /// The switch to the target's slot is being saved.
    Switching {
        target: Target,
    },
    /// Replicas are being replaced by the target (model `revision`); the trial clock starts
    /// when all of them are ready (`healthy_since`).
    Trial {
        target: Target,
        revision: u64,
        deadline: Instant,
        healthy_since: Option<Instant>,
    },
    /// The health commands run.
    Checking {
        target: Target,
    },
    /// Every replica is being stopped (`draining`), then the database restored, then the
    /// previous release started.
    RollingBack {
        target: Target,
        reason: String,
        draining: bool,
    },
    /// The outcome (commit, rollback, refusal) is saved; its receipt is being written, off the
    /// dispatcher's loop. `about` is the version or bundle it is about.
    Recording {
        about: String,
    },
}

impl Phase {
    /// The phase as `status` shows it.
    pub fn state(&self) -> UpdateState {
        match self {
            Phase::Idle => UpdateState::Idle,
            Phase::Installing { .. } => UpdateState::Installing,
            Phase::Snapshotting { .. } | Phase::Switching { .. } => UpdateState::Snapshotting,
            Phase::Trial {
                healthy_since: None,
                ..
            } => UpdateState::RollingOut,
            Phase::Trial { .. } => UpdateState::Trial,
            Phase::Checking { .. } => UpdateState::Checking,
            Phase::RollingBack { .. } => UpdateState::RollingBack,
            Phase::Recording { .. } => UpdateState::Recording,
        }
    }
}

/// Why an install ended without a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    /// The slot was written to before the install stopped (a write error, a bad chunk): the
    /// refusal is recorded in the slot state rather than shown as a bundle refused at the door.
    pub slot_touched: bool,
    /// The file is not to blame (the stick was pulled out, a write error): offered again.
    pub offer_again: bool,
}

/// What happened, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Install this bundle (from `apply` or an inbox scan).
    Install {
        bundle: Offer,
    },
    /// The install ended: the release is in its slot, marked ready; or it was refused.
    Installed(Result<Target, Refusal>),
    Snapshotted(Result<(), String>),
    /// The switch to the target's slot was saved (or could not be).
    Switched(Result<(), String>),
    /// The model's view of the trial release now: every replica of it ready (`settled`), or
    /// one of them failed (`failure`).
    Watched {
        settled: bool,
        failure: Option<String>,
    },
    HealthChecked(Result<(), String>),
    /// Every replica has stopped.
    Drained,
    Restored(Result<(), String>),
    /// The receipt of the outcome is written (or could not be).
    Recorded,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Install { .. } => "install",
            Event::Installed(_) => "installed",
            Event::Snapshotted(_) => "snapshotted",
            Event::Switched(_) => "switched",
            Event::Watched { .. } => "watched",
            Event::HealthChecked(_) => "health_checked",
            Event::Drained => "drained",
            Event::Restored(_) => "restored",
            Event::Recorded => "recorded",
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Verify and install the bundle (blocking); report [`Event::Installed`].
    Install { bundle: Offer },
    /// Record a refused install: the result `status` shows, and the receipt; report
    /// [`Event::Recorded`].
    Refused { bundle: Offer, refusal: Refusal },
    /// Have the running release snapshot the database (blocking); report [`Event::Snapshotted`].
    Snapshot,
    /// Save the switch to `slot`; report [`Event::Switched`].
    Switch { slot: SlotName },
    /// Replace the replicas with `slot`'s release as model revision `revision`.
    RollOut { revision: u64, slot: SlotName },
    /// Run the health commands; report [`Event::HealthChecked`].
    CheckHealth,
    /// Save the commit (the new anti-rollback floor), write the receipt; report
    /// [`Event::Recorded`].
    Commit { target: Target },
    /// Stop every replica and run the previous release as model revision `revision`, starting
    /// none until [`Action::Resume`]; report [`Event::Drained`] when every replica stopped.
    Recreate { revision: u64 },
    /// Restore the database with the previous release (blocking); report [`Event::Restored`].
    Restore,
    /// Save the rollback, write the receipt; report [`Event::Recorded`].
    RecordRollback { target: Target, reason: String },
    /// Start the previous release's replicas.
    Resume,
}

/// An event that does not belong to the phase: refused, the phase unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the OTA event `{event}` does not belong to the phase {phase}")]
pub struct OutOfPhase {
    pub event: &'static str,
    pub phase: UpdateState,
}

/// The trial's clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long every replica of the new release must stay ready before the health commands.
    pub trial: Duration,
    /// How long the new release has to get there.
    pub trial_deadline: Duration,
}

/// What to do with a trial found at start (a power cut or crash during it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// Try the release again.
    Retry,
    /// Roll back at once, for this reason.
    RollBack(String),
}

/// A trial that has taken `starts` supervisor starts (this one included) is rolled back once
/// it reaches `max_starts`.
pub fn after_restart(version: &str, starts: u32, max_starts: u32) -> Restart {
    if starts >= max_starts {
        Restart::RollBack(format!(
            "release {version} was on trial through {starts} supervisor starts"
        ))
    } else {
        Restart::Retry
    }
}

/// The update state machine.
#[derive(Debug)]
pub struct Machine {
    phase: Phase,
    timings: Timings,
    /// Model revisions given out so far are below this (revision 0 is what ran at start).
    next_revision: u64,
}

impl Machine {
    pub fn new(timings: Timings) -> Machine {
        Machine {
            phase: Phase::Idle,
            timings,
            next_revision: 1,
        }
    }

    /// A machine resuming a trial after a restart: the replicas start on the target's release
    /// as revision 0.
    pub fn resuming(timings: Timings, target: Target, now: Instant) -> Machine {
        Machine {
            phase: Phase::Trial {
                target,
                revision: 0,
                deadline: now + timings.trial_deadline,
                healthy_since: None,
            },
            timings,
            next_revision: 1,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The model revision on trial, while the trial runs.
    pub fn trial_revision(&self) -> Option<u64> {
        match self.phase {
            Phase::Trial { revision, .. } => Some(revision),
            _ => None,
        }
    }

    /// When [`Event::Watched`] is due again: the trial time running out, or the deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Trial {
                deadline,
                healthy_since,
                ..
            } => Some(healthy_since.map_or(*deadline, |since| {
                (since + self.timings.trial).min(*deadline)
            })),
            _ => None,
        }
    }

    /// Takes one event at `now`: the actions to carry out, in order, or the refusal of an event
    /// that does not belong to the phase (then nothing changed).
    pub fn handle(&mut self, event: Event, now: Instant) -> Result<Vec<Action>, OutOfPhase> {
        let refused = OutOfPhase {
            event: event.name(),
            phase: self.phase.state(),
        };
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        match self.step(phase, event, now) {
            Ok((next, actions)) => {
                self.phase = next;
                Ok(actions)
            }
            Err(unchanged) => {
                self.phase = unchanged;
                Err(refused)
            }
        }
    }

    /// The transition table: `(phase, event)` to the next phase and its actions; any pair not
    /// listed gives the phase back untouched. One piece on purpose: the whole table in one
    /// `match` is what `agent.md`'s diagram and the tests are checked against.
    fn step(
        &mut self,
        phase: Phase,
        event: Event,
        now: Instant,
    ) -> Result<(Phase, Vec<Action>), Phase> {
        Ok(match (phase, event) {
            (Phase::Idle, Event::Install { bundle }) => (
                Phase::Installing {
                    bundle: bundle.clone(),
                },
                vec![Action::Install { bundle }],
            ),
            (Phase::Installing { .. }, Event::Installed(Ok(target))) => {
                (Phase::Snapshotting { target }, vec![Action::Snapshot])
            }
            (Phase::Installing { bundle }, Event::Installed(Err(refusal))) => (
                Phase::Recording {
                    about: bundle.to_string(),
                },
                vec![Action::Refused { bundle, refusal }],
            ),
            // No snapshot, no update: the slot stays installed but unused.
            (Phase::Snapshotting { .. }, Event::Snapshotted(Err(_))) => (Phase::Idle, vec![]),
            (Phase::Snapshotting { target }, Event::Snapshotted(Ok(()))) => {
                let slot = target.slot;
                (Phase::Switching { target }, vec![Action::Switch { slot }])
            }
            (Phase::Switching { .. }, Event::Switched(Err(_))) => (Phase::Idle, vec![]),
            (Phase::Switching { target }, Event::Switched(Ok(()))) => {
                let revision = self.revision();
                let slot = target.slot;
                (
                    Phase::Trial {
                        target,
                        revision,
                        deadline: now + self.timings.trial_deadline,
                        healthy_since: None,
                    },
                    vec![Action::RollOut { revision, slot }],
                )
            }
            (
                Phase::Trial {
                    target,
                    revision,
                    deadline,
                    healthy_since,
                },
                Event::Watched { settled, failure },
            ) => self.watched(
                target,
                revision,
                deadline,
                healthy_since,
                settled,
                failure,
                now,
            ),
            (Phase::Checking { target }, Event::HealthChecked(Ok(()))) => (
                Phase::Recording {
                    about: target.version.clone(),
                },
                vec![Action::Commit { target }],
            ),
            (Phase::Checking { target }, Event::HealthChecked(Err(reason))) => {
                self.roll_back(target, format!("a health command failed: {reason}"))
            }
            (
                Phase::RollingBack {
                    target,
                    reason,
                    draining: true,
                },
                Event::Drained,
            ) => (
                Phase::RollingBack {
                    target,
                    reason,
                    draining: false,
                },
                vec![Action::Restore],
            ),
            (
                Phase::RollingBack {
                    target,
                    reason,
                    draining: false,
                },
                Event::Restored(result),
            ) => {
                let reason = match result {
                    Ok(()) => reason,
                    Err(error) => format!("{reason}; the database could not be restored: {error}"),
                };
                (
                    Phase::Recording {
                        about: target.version.clone(),
                    },
                    vec![Action::RecordRollback { target, reason }, Action::Resume],
                )
            }
            (Phase::Recording { .. }, Event::Recorded) => (Phase::Idle, vec![]),
            (phase, _) => return Err(phase),
        })
    }

    /// Judges the trial from the model's view: a failure or the deadline rolls back; every
    /// replica ready for `trial` moves on to the health commands; a replica leaving readiness
    /// restarts the trial clock.
    #[allow(clippy::too_many_arguments)] // One phase's fields, taken apart by the table.
    fn watched(
        &mut self,
        target: Target,
        revision: u64,
        deadline: Instant,
        healthy_since: Option<Instant>,
        settled: bool,
        failure: Option<String>,
        now: Instant,
    ) -> (Phase, Vec<Action>) {
        if let Some(failure) = failure {
            return self.roll_back(
                target,
                format!("a replica of the new release failed: {failure}"),
            );
        }
        if now >= deadline {
            let reason = format!(
                "the new release was not ready and stable within {:?}",
                self.timings.trial_deadline
            );
            return self.roll_back(target, reason);
        }
        let healthy_since = if settled {
            Some(healthy_since.unwrap_or(now))
        } else {
            None
        };
        if let Some(since) = healthy_since
            && now.saturating_duration_since(since) >= self.timings.trial
        {
            return (Phase::Checking { target }, vec![Action::CheckHealth]);
        }
        let phase = Phase::Trial {
            target,
            revision,
            deadline,
            healthy_since,
        };
        (phase, vec![])
    }

    fn roll_back(&mut self, target: Target, reason: String) -> (Phase, Vec<Action>) {
        let revision = self.revision();
        (
            Phase::RollingBack {
                target,
                reason,
                draining: true,
            },
            vec![Action::Recreate { revision }],
        )
    }

    fn revision(&mut self) -> u64 {
        let revision = self.next_revision;
        self.next_revision += 1;
        revision
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
