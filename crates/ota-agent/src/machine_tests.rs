//! Unit tests of the update state machine: every transition, and every event in every phase it
//! does not belong to, with an injected clock (no sleeps, no files).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edge_proto::UpdateState;
use ota_slots::SlotName;

use super::*;

const TIMINGS: Timings = Timings {
    trial: Duration::from_secs(10),
    trial_deadline: Duration::from_secs(60),
};

fn target() -> Target {
    Target {
        slot: SlotName::B,
        version: "2.0.0".into(),
        issued_at: 7,
        bundle: Some(bundle()),
    }
}

fn bundle() -> Offer {
    Offer::File(PathBuf::from("/media/stick/v2.bundle"))
}

/// A machine put in `phase` (revisions 1 and up still to give out).
fn machine_in(phase: Phase) -> Machine {
    let mut machine = Machine::new(TIMINGS);
    machine.phase = phase;
    machine
}

fn trial(t0: Instant) -> Phase {
    Phase::Trial {
        target: target(),
        revision: 1,
        deadline: t0 + TIMINGS.trial_deadline,
        healthy_since: None,
    }
}

fn rolling_back(draining: bool) -> Phase {
    Phase::RollingBack {
        target: target(),
        reason: "a replica of the new release failed: exit 3".into(),
        draining,
    }
}

/// One of each phase.
fn every_phase(t0: Instant) -> Vec<Phase> {
    vec![
        Phase::Idle,
        Phase::Installing { bundle: bundle() },
        Phase::Snapshotting { target: target() },
        Phase::Switching { target: target() },
        trial(t0),
        Phase::Trial {
            target: target(),
            revision: 1,
            deadline: t0 + TIMINGS.trial_deadline,
            healthy_since: Some(t0),
        },
        Phase::Checking { target: target() },
        rolling_back(true),
        rolling_back(false),
        Phase::Recording {
            about: "2.0.0".into(),
        },
    ]
}

/// One of each event, with each outcome where it has one.
fn every_event() -> Vec<Event> {
    vec![
        Event::Install { bundle: bundle() },
        Event::Installed(Ok(target())),
        Event::Installed(Err(Refusal {
            reason: "bad signature".into(),
            slot_touched: false,
            offer_again: false,
        })),
        Event::Snapshotted(Ok(())),
        Event::Snapshotted(Err("disk full".into())),
        Event::Switched(Ok(())),
        Event::Switched(Err("read-only file system".into())),
        Event::Watched {
            settled: true,
            failure: None,
        },
        Event::Watched {
            settled: false,
            failure: Some("exit 3".into()),
        },
        Event::HealthChecked(Ok(())),
        Event::HealthChecked(Err("check exited 1".into())),
        Event::Drained,
        Event::Restored(Ok(())),
        Event::Restored(Err("no snapshot".into())),
        Event::Recorded,
    ]
}

/// Whether `event` belongs to `phase` (the table in `Machine::step`, written out again).
fn belongs(phase: &Phase, event: &Event) -> bool {
    matches!(
        (phase, event),
        (Phase::Idle, Event::Install { .. })
            | (Phase::Installing { .. }, Event::Installed(_))
            | (Phase::Snapshotting { .. }, Event::Snapshotted(_))
            | (Phase::Switching { .. }, Event::Switched(_))
            | (Phase::Trial { .. }, Event::Watched { .. })
            | (Phase::Checking { .. }, Event::HealthChecked(_))
            | (Phase::RollingBack { draining: true, .. }, Event::Drained)
            | (
                Phase::RollingBack {
                    draining: false,
                    ..
                },
                Event::Restored(_)
            )
            | (Phase::Recording { .. }, Event::Recorded)
    )
}

#[test]
fn every_event_out_of_its_phase_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut refused = 0;
    for phase in every_phase(t0) {
        for event in every_event() {
            if belongs(&phase, &event) {
                continue;
            }
            let mut machine = machine_in(phase.clone());
            let name = event.name();
            let result = machine.handle(event, t0);
            assert_eq!(
                result,
                Err(OutOfPhase {
                    event: name,
                    phase: phase.state()
                }),
                "{name} in {phase:?}"
            );
            assert_eq!(machine.phase(), &phase, "{name} changed {phase:?}");
            assert_eq!(
                machine.next_revision, 1,
                "{name} in {phase:?} gave out a revision"
            );
            refused += 1;
        }
    }
    // 10 phases x 15 events, less the 17 pairs that belong (two trial phases take both
    // `watched` events).
    assert_eq!(refused, 10 * 15 - 17);
}

#[test]
fn every_event_in_its_phase_is_taken() {
    let t0 = Instant::now();
    for phase in every_phase(t0) {
        for event in every_event().into_iter().filter(|e| belongs(&phase, e)) {
            let name = event.name();
            let result = machine_in(phase.clone()).handle(event, t0);
            assert!(result.is_ok(), "{name} in {phase:?}: {result:?}");
        }
    }
}

#[test]
fn the_refusal_names_the_event_and_the_phase() {
    let t0 = Instant::now();
    let error = machine_in(trial(t0))
        .handle(Event::Restored(Ok(())), t0)
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the OTA event `restored` does not belong to the phase rolling_out"
    );
}

#[test]
fn an_install_goes_from_the_bundle_to_the_snapshot_to_the_switch_to_the_rollout() {
    let t0 = Instant::now();
    let mut machine = Machine::new(TIMINGS);
    let install = Event::Install { bundle: bundle() };
    assert_eq!(
        machine.handle(install, t0),
        Ok(vec![Action::Install { bundle: bundle() }])
    );
    assert_eq!(machine.phase().state(), UpdateState::Installing);
    assert_eq!(
        machine.handle(Event::Installed(Ok(target())), t0),
        Ok(vec![Action::Snapshot])
    );
    assert_eq!(machine.phase().state(), UpdateState::Snapshotting);
    assert_eq!(
        machine.handle(Event::Snapshotted(Ok(())), t0),
        Ok(vec![Action::Switch { slot: SlotName::B }])
    );
    assert_eq!(machine.phase(), &Phase::Switching { target: target() });
    assert_eq!(
        machine.handle(Event::Switched(Ok(())), t0),
        Ok(vec![Action::RollOut {
            revision: 1,
            slot: SlotName::B
        }])
    );
    assert_eq!(machine.phase(), &trial(t0));
    assert_eq!(machine.trial_revision(), Some(1));
    assert_eq!(machine.next_deadline(), Some(t0 + TIMINGS.trial_deadline));
}

#[test]
fn a_refused_bundle_is_recorded_and_the_agent_is_idle_again() {
    let t0 = Instant::now();
    let mut machine = machine_in(Phase::Installing { bundle: bundle() });
    let refusal = Refusal {
        reason: "downgrade refused".into(),
        slot_touched: false,
        offer_again: false,
    };
    assert_eq!(
        machine.handle(Event::Installed(Err(refusal.clone())), t0),
        Ok(vec![Action::Refused {
            bundle: bundle(),
            refusal
        }])
    );
    assert_eq!(machine.phase().state(), UpdateState::Recording);
    assert_eq!(machine.handle(Event::Recorded, t0), Ok(vec![]));
    assert_eq!(machine.phase(), &Phase::Idle);
}

#[test]
fn a_failed_snapshot_or_switch_starts_no_rollout() {
    let t0 = Instant::now();
    let mut machine = machine_in(Phase::Snapshotting { target: target() });
    assert_eq!(
        machine.handle(Event::Snapshotted(Err("disk full".into())), t0),
        Ok(vec![])
    );
    assert_eq!(machine.phase(), &Phase::Idle);
    let mut machine = machine_in(Phase::Switching { target: target() });
    assert_eq!(
        machine.handle(Event::Switched(Err("read-only".into())), t0),
        Ok(vec![])
    );
    assert_eq!(machine.phase(), &Phase::Idle);
    assert_eq!(machine.next_revision, 1, "no revision given out");
}

fn watched(settled: bool) -> Event {
    Event::Watched {
        settled,
        failure: None,
    }
}

#[test]
fn a_trial_commits_after_every_replica_stayed_ready_for_the_trial_time() {
    let t0 = Instant::now();
    let mut machine = machine_in(trial(t0));
    assert_eq!(machine.handle(watched(true), t0), Ok(vec![]));
    assert_eq!(machine.phase().state(), UpdateState::Trial);
    assert_eq!(machine.next_deadline(), Some(t0 + TIMINGS.trial));
    let almost = t0 + TIMINGS.trial - Duration::from_millis(1);
    assert_eq!(machine.handle(watched(true), almost), Ok(vec![]));
    assert_eq!(
        machine.handle(watched(true), t0 + TIMINGS.trial),
        Ok(vec![Action::CheckHealth])
    );
    assert_eq!(machine.phase(), &Phase::Checking { target: target() });
    assert_eq!(machine.next_deadline(), None);
    assert_eq!(
        machine.handle(Event::HealthChecked(Ok(())), t0 + TIMINGS.trial),
        Ok(vec![Action::Commit { target: target() }])
    );
    // Idle once the receipt is written, off the dispatcher's loop.
    assert_eq!(
        machine.phase(),
        &Phase::Recording {
            about: "2.0.0".into()
        }
    );
    assert_eq!(machine.handle(Event::Recorded, t0), Ok(vec![]));
    assert_eq!(machine.phase(), &Phase::Idle);
}

#[test]
fn a_replica_leaving_readiness_restarts_the_trial_clock() {
    let t0 = Instant::now();
    let mut machine = machine_in(trial(t0));
    machine.handle(watched(true), t0).unwrap();
    let dip = t0 + TIMINGS.trial / 2;
    assert_eq!(machine.handle(watched(false), dip), Ok(vec![]));
    assert_eq!(machine.phase().state(), UpdateState::RollingOut);
    machine.handle(watched(true), dip).unwrap();
    // The time counts again from the return to readiness, not from t0.
    assert_eq!(
        machine.handle(watched(true), t0 + TIMINGS.trial),
        Ok(vec![])
    );
    assert_eq!(
        machine.handle(watched(true), dip + TIMINGS.trial),
        Ok(vec![Action::CheckHealth])
    );
}

#[test]
fn the_next_look_is_at_the_end_of_the_trial_time_unless_the_deadline_comes_first() {
    let t0 = Instant::now();
    let mut machine = machine_in(trial(t0));
    let late = t0 + TIMINGS.trial_deadline - TIMINGS.trial / 2;
    machine.handle(watched(true), late).unwrap();
    assert_eq!(machine.next_deadline(), Some(t0 + TIMINGS.trial_deadline));
}

#[test]
fn a_failing_replica_rolls_back_through_drain_restore_and_resume() {
    let t0 = Instant::now();
    let mut machine = machine_in(trial(t0));
    let failed = Event::Watched {
        settled: false,
        failure: Some("replica-3 exited with code 3".into()),
    };
    // A new model revision for the previous release: every replica is recreated.
    assert_eq!(
        machine.handle(failed, t0),
        Ok(vec![Action::Recreate { revision: 1 }])
    );
    let reason = "a replica of the new release failed: replica-3 exited with code 3";
    assert_eq!(
        machine.phase(),
        &Phase::RollingBack {
            target: target(),
            reason: reason.into(),
            draining: true
        }
    );
    assert_eq!(
        machine.handle(Event::Drained, t0),
        Ok(vec![Action::Restore])
    );
    assert_eq!(
        machine.handle(Event::Restored(Err("no snapshot".into())), t0),
        Ok(vec![
            Action::RecordRollback {
                target: target(),
                reason: format!("{reason}; the database could not be restored: no snapshot"),
            },
            Action::Resume
        ])
    );
    assert_eq!(machine.phase().state(), UpdateState::Recording);
    assert_eq!(machine.handle(Event::Recorded, t0), Ok(vec![]));
    assert_eq!(machine.phase(), &Phase::Idle);
}

#[test]
fn a_release_that_never_settles_is_rolled_back_at_the_deadline() {
    let t0 = Instant::now();
    let mut machine = machine_in(trial(t0));
    let deadline = t0 + TIMINGS.trial_deadline;
    let before = deadline - Duration::from_millis(1);
    assert_eq!(machine.handle(watched(false), before), Ok(vec![]));
    assert_eq!(
        machine.handle(watched(false), deadline),
        Ok(vec![Action::Recreate { revision: 1 }])
    );
    let Phase::RollingBack { reason, .. } = machine.phase() else {
        panic!("rolling back: {:?}", machine.phase());
    };
    assert!(
        reason.contains("not ready and stable within 60s"),
        "{reason}"
    );
}

#[test]
fn a_failed_health_command_rolls_back_instead_of_committing() {
    let t0 = Instant::now();
    let mut machine = machine_in(Phase::Checking { target: target() });
    assert_eq!(
        machine.handle(Event::HealthChecked(Err("check exited 1".into())), t0),
        Ok(vec![Action::Recreate { revision: 1 }])
    );
    let Phase::RollingBack {
        reason, draining, ..
    } = machine.phase()
    else {
        panic!("rolling back: {:?}", machine.phase());
    };
    assert_eq!(reason, "a health command failed: check exited 1");
    assert!(draining);
}

#[test]
fn a_successful_restore_keeps_the_reason_as_it_was() {
    let t0 = Instant::now();
    let mut machine = machine_in(rolling_back(false));
    let actions = machine.handle(Event::Restored(Ok(())), t0).unwrap();
    assert_eq!(
        actions[0],
        Action::RecordRollback {
            target: target(),
            reason: "a replica of the new release failed: exit 3".into()
        }
    );
}

#[test]
fn revisions_given_out_are_never_reused() {
    let t0 = Instant::now();
    let mut machine = machine_in(Phase::Switching { target: target() });
    machine.handle(Event::Switched(Ok(())), t0).unwrap();
    let failed = Event::Watched {
        settled: false,
        failure: Some("exit 3".into()),
    };
    assert_eq!(
        machine.handle(failed, t0),
        Ok(vec![Action::Recreate { revision: 2 }])
    );
}

#[test]
fn a_resumed_trial_runs_as_revision_zero_with_a_fresh_deadline() {
    let t0 = Instant::now();
    let machine = Machine::resuming(TIMINGS, target(), t0);
    assert_eq!(machine.trial_revision(), Some(0));
    assert_eq!(machine.next_deadline(), Some(t0 + TIMINGS.trial_deadline));
    assert_eq!(machine.next_revision, 1);
}

#[test]
fn a_trial_is_retried_after_a_restart_until_it_took_max_starts() {
    assert_eq!(after_restart("2.0.0", 1, 3), Restart::Retry);
    assert_eq!(after_restart("2.0.0", 2, 3), Restart::Retry);
    assert_eq!(
        after_restart("2.0.0", 3, 3),
        Restart::RollBack("release 2.0.0 was on trial through 3 supervisor starts".into())
    );
}
