//! Transitions of the pure model, with a fake clock: no process, no socket, no sleep.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use edge_proto::{ExitReason, ReplicaState};

use crate::model::{Action, Cause, Model, ProbeKind, Signal, Timing};
use crate::policy::{Probe, ProbeAction, Probes, RestartPolicy};

const MS: Duration = Duration::from_millis(1);

fn probe(period_ms: u64, failures: u32) -> Probe {
    Probe {
        action: ProbeAction::Tcp,
        initial_delay: Duration::ZERO,
        period: Duration::from_millis(period_ms),
        timeout: 200 * MS,
        success_threshold: NonZeroU32::MIN,
        failure_threshold: NonZeroU32::new(failures).unwrap(),
    }
}

fn timing() -> Timing {
    Timing {
        probes: Probes {
            startup: Some(probe(20, 5)),
            liveness: Some(probe(250, 2)),
            readiness: Some(probe(250, 2)),
        },
        restart: RestartPolicy {
            backoff: 250 * MS,
            max_backoff: Duration::from_secs(30),
            jitter: 0.0,
            reset_after: Duration::from_secs(60),
            budget: 5,
            budget_window: Duration::from_secs(60),
        },
        stop_grace: Duration::from_secs(5),
        hung_grace: 500 * MS,
    }
}

/// Drives a model like the driver does, with fake pids (1000 + generation) and ports.
struct Harness {
    model: Model,
    t0: Instant,
    now: Instant,
    log: Vec<Action>,
}

impl Harness {
    fn new(replicas: u32) -> Self {
        let t0 = Instant::now();
        let mut h = Harness {
            model: Model::new(replicas, timing(), t0, 7),
            t0,
            now: t0,
            log: Vec::new(),
        };
        h.settle();
        h
    }

    /// Reports every spawn as successful, and keeps the rest of the actions.
    fn settle(&mut self) {
        loop {
            let actions = self.model.take_actions();
            if actions.is_empty() {
                return;
            }
            for action in actions {
                if let Action::Spawn {
                    slot, generation, ..
                } = action
                {
                    let pid = 1000 + generation as u32;
                    self.model.spawned(
                        slot,
                        generation,
                        Ok((pid, 20000 + generation as u16)),
                        self.now,
                    );
                }
                self.log.push(action);
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.model.tick(self.now);
        self.settle();
    }

    /// Answers every probe in flight with `ok(slot, kind)`.
    fn answer(&mut self, ok: impl Fn(usize, ProbeKind) -> bool) {
        let pending: Vec<_> = self
            .log
            .drain(..)
            .filter_map(|a| match a {
                Action::Probe {
                    slot,
                    generation,
                    kind,
                    ..
                } => Some((slot, generation, kind)),
                _ => None,
            })
            .collect();
        for (slot, generation, kind) in pending {
            let outcome = if ok(slot, kind) {
                Ok(())
            } else {
                Err("timed out".to_owned())
            };
            self.model
                .probe_result(slot, generation, kind, outcome, self.now);
        }
        self.settle();
    }

    fn signals(&self) -> Vec<(u32, Signal)> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Signal { pid, signal } => Some((*pid, *signal)),
                _ => None,
            })
            .collect()
    }

    fn pid_of(&self, replica: &str) -> u32 {
        let status = self.model.status(self.now);
        status
            .iter()
            .find(|r| r.id == replica)
            .and_then(|r| r.pid)
            .expect("running")
    }

    fn ready(&self) -> Vec<String> {
        self.model
            .ready_backends()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Brings every replica to ready: startup probe, then readiness.
    fn all_ready(&mut self) {
        self.answer(|_, _| true);
        self.answer(|_, _| true);
    }
}

#[test]
fn all_replicas_start_at_once_and_become_ready_through_startup_then_readiness() {
    let mut h = Harness::new(3);
    let status = h.model.status(h.now);
    assert!(
        status
            .iter()
            .all(|r| r.state == ReplicaState::Starting && r.pid.is_some()),
        "{status:?}"
    );
    assert!(h.ready().is_empty());
    h.answer(|_, kind| kind == ProbeKind::Startup);
    assert!(
        h.ready().is_empty(),
        "startup alone does not make a replica ready"
    );
    h.answer(|_, kind| kind == ProbeKind::Readiness);
    assert_eq!(h.ready(), ["replica-0", "replica-1", "replica-2"]);
}

/// The startup probes sent so far (and forgets them, as if answered later).
fn startup_probes(h: &mut Harness) -> usize {
    let n = h
        .log
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Probe {
                    kind: ProbeKind::Startup,
                    ..
                }
            )
        })
        .count();
    h.log.clear();
    n
}

#[test]
fn a_replica_that_says_it_is_ready_is_probed_at_once_not_at_the_next_period() {
    let mut h = Harness::new(1);
    // The first startup probe goes out at the spawn and fails: not listening yet.
    h.answer(|_, _| false);
    assert_eq!(
        startup_probes(&mut h),
        0,
        "the next one waits for the period"
    );
    h.advance(5 * MS);
    assert_eq!(startup_probes(&mut h), 0);
    let pid = h.pid_of("replica-0");
    assert!(h.model.notified(pid, h.now));
    h.settle();
    let probes: Vec<_> = h.log.clone();
    assert_eq!(startup_probes(&mut h), 1, "probed at once: {probes:?}");
    h.log = probes;
    h.answer(|_, _| true);
    h.answer(|_, _| true);
    assert_eq!(
        h.ready(),
        ["replica-0"],
        "ready 5 ms after the spawn, not 20"
    );
    // Once running, a notification is not a startup matter any more.
    assert!(!h.model.notified(pid, h.now));
}

#[test]
fn a_ready_word_during_a_probe_reprobes_once_and_only_the_first_word_counts() {
    let mut h = Harness::new(1);
    let pid = h.pid_of("replica-0");
    // Told while the first probe is in flight: it fails, and the next goes out at once.
    assert!(h.model.notified(pid, h.now));
    assert!(!h.model.notified(pid, h.now), "a second word is ignored");
    assert!(!h.model.notified(4242, h.now), "an unknown pid is ignored");
    h.settle();
    assert_eq!(
        startup_probes(&mut h),
        1,
        "only the probe sent at the spawn"
    );
    h.model
        .probe_result(0, 1, ProbeKind::Startup, Err("refused".into()), h.now);
    h.settle();
    assert_eq!(startup_probes(&mut h), 1, "again at once after the failure");
    // That one fails too: the rest are polled at the period, as for a replica that never speaks.
    h.model
        .probe_result(0, 1, ProbeKind::Startup, Err("refused".into()), h.now);
    h.settle();
    assert_eq!(startup_probes(&mut h), 0);
    h.advance(20 * MS);
    assert_eq!(startup_probes(&mut h), 1);
}

#[test]
fn a_crash_restarts_immediately_then_backs_off() {
    let mut h = Harness::new(1);
    h.all_ready();
    let mut starts = Vec::new();
    for _ in 0..4 {
        let pid = h.pid_of("replica-0");
        h.model.exited(pid, Cause::Exit(3), h.now);
        h.settle();
        assert!(
            h.ready().is_empty(),
            "a dead replica is out of rotation at once"
        );
        let status = h.model.status(h.now);
        starts.push(
            status[0]
                .next_start_in_seconds
                .map_or(0, |s| (s * 1000.0).round() as u64),
        );
        let wait = Duration::from_secs_f64(status[0].next_start_in_seconds.unwrap_or(0.0));
        h.advance(wait);
        h.all_ready();
    }
    assert_eq!(starts, [0, 250, 500, 1000]);
    let status = h.model.status(h.now);
    assert_eq!(status[0].restarts, 4);
    assert_eq!(status[0].last_exit.as_ref().unwrap().code, Some(3));
}

#[test]
fn a_hung_replica_leaves_rotation_and_is_replaced_while_it_is_killed() {
    let mut h = Harness::new(2);
    h.all_ready();
    let hung = h.pid_of("replica-1");
    // replica-1 stops answering: two failed liveness periods.
    for _ in 0..2 {
        h.advance(250 * MS);
        h.answer(|slot, _| slot != 1);
    }
    assert_eq!(h.ready(), ["replica-0"]);
    assert!(h.signals().contains(&(hung, Signal::Term)));
    let replacement = h.pid_of("replica-1");
    assert_ne!(replacement, hung, "a replacement was started at once");
    let status = h.model.status(h.now);
    assert_eq!(
        status[1].last_exit.as_ref().unwrap().reason,
        ExitReason::Liveness
    );
    // SIGKILL after the hung grace if it never exits.
    assert!(!h.signals().contains(&(hung, Signal::Kill)));
    h.advance(500 * MS);
    assert!(h.signals().contains(&(hung, Signal::Kill)), "{:?}", h.log);
    h.answer(|_, _| true);
    h.answer(|_, _| true);
    assert_eq!(h.ready(), ["replica-0", "replica-1"]);
}

#[test]
fn failing_readiness_takes_a_replica_out_of_rotation_without_restarting_it() {
    let mut h = Harness::new(1);
    h.all_ready();
    let pid = h.pid_of("replica-0");
    h.advance(250 * MS);
    h.answer(|_, kind| kind != ProbeKind::Readiness);
    assert_eq!(
        h.ready(),
        ["replica-0"],
        "one failure is below the threshold"
    );
    h.advance(250 * MS);
    h.answer(|_, kind| kind != ProbeKind::Readiness);
    assert!(h.ready().is_empty());
    assert_eq!(h.pid_of("replica-0"), pid);
    assert!(h.signals().is_empty());
    h.advance(250 * MS);
    h.answer(|_, _| true);
    assert_eq!(h.ready(), ["replica-0"]);
}

#[test]
fn a_replica_that_never_passes_startup_is_restarted() {
    let mut h = Harness::new(1);
    let first = h.pid_of("replica-0");
    for _ in 0..5 {
        h.answer(|_, _| false);
        h.advance(20 * MS);
    }
    assert!(h.signals().contains(&(first, Signal::Term)));
    let status = h.model.status(h.now);
    assert_eq!(
        status[0].last_exit.as_ref().unwrap().reason,
        ExitReason::StartupTimeout
    );
    assert_ne!(h.pid_of("replica-0"), first);
}

#[test]
fn a_crash_loop_is_flagged_and_slowed_to_the_cap() {
    let mut h = Harness::new(1);
    for _ in 0..6 {
        let pid = h.pid_of("replica-0");
        h.model.exited(pid, Cause::Exit(1), h.now);
        h.settle();
        let wait = h.model.status(h.now)[0]
            .next_start_in_seconds
            .unwrap_or(0.0);
        if h.model.status(h.now)[0].crash_looping {
            assert_eq!(wait, 30.0);
            return;
        }
        h.advance(Duration::from_secs_f64(wait));
    }
    panic!("six crashes within a minute never flagged a crash loop");
}

#[test]
fn scaling_down_stops_the_highest_replicas_out_of_rotation_first() {
    let mut h = Harness::new(3);
    h.all_ready();
    let top = h.pid_of("replica-2");
    h.log.clear();
    h.model.scale(2, h.now).unwrap();
    h.settle();
    assert_eq!(h.ready(), ["replica-0", "replica-1"]);
    assert_eq!(h.signals(), [(top, Signal::Term)]);
    assert_eq!(h.model.desired(), 2);
    h.model.exited(top, Cause::Signal(15), h.now);
    assert_eq!(h.model.status(h.now).len(), 2);
    h.model.scale(4, h.now).unwrap();
    h.settle();
    let ids: Vec<_> = h.model.status(h.now).into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["replica-0", "replica-1", "replica-2", "replica-3"]);
}

#[test]
fn a_restart_command_replaces_without_backoff_or_failure_count() {
    let mut h = Harness::new(2);
    h.all_ready();
    let old = h.pid_of("replica-0");
    h.model.restart("replica-0", h.now).unwrap();
    h.settle();
    assert!(h.signals().contains(&(old, Signal::Term)));
    assert_ne!(h.pid_of("replica-0"), old);
    assert_eq!(h.model.status(h.now)[0].restarts, 0);
    assert!(h.model.restart("replica-9", h.now).is_err());
}

#[test]
fn shutdown_stops_everything_and_escalates_after_the_grace() {
    let mut h = Harness::new(2);
    h.all_ready();
    let pids = [h.pid_of("replica-0"), h.pid_of("replica-1")];
    h.log.clear();
    h.model.shutdown(h.now);
    h.settle();
    assert!(h.ready().is_empty());
    assert_eq!(
        h.signals(),
        [(pids[0], Signal::Term), (pids[1], Signal::Term)]
    );
    h.model.exited(pids[0], Cause::Exit(0), h.now);
    assert!(!h.model.is_finished());
    h.advance(Duration::from_secs(5));
    assert!(h.signals().contains(&(pids[1], Signal::Kill)));
    h.model.exited(pids[1], Cause::Signal(9), h.now);
    assert!(h.model.is_finished());
    assert!(h.model.scale(3, h.now).is_err());
}

#[test]
fn probe_results_for_a_replaced_process_are_ignored() {
    let mut h = Harness::new(1);
    h.all_ready();
    h.advance(250 * MS);
    let stale: Vec<_> = h.log.drain(..).collect();
    let pid = h.pid_of("replica-0");
    h.model.exited(pid, Cause::Signal(9), h.now);
    h.settle();
    for action in stale {
        if let Action::Probe {
            slot,
            generation,
            kind,
            ..
        } = action
        {
            h.model
                .probe_result(slot, generation, kind, Err("late".into()), h.now);
        }
    }
    h.settle();
    assert_eq!(
        h.model.status(h.now)[0].restarts,
        1,
        "only the crash counted"
    );
}

#[test]
fn deadlines_cover_every_pending_probe_and_start() {
    let mut h = Harness::new(1);
    h.all_ready();
    let next = h.model.next_deadline().expect("probes are scheduled");
    assert!(
        next > h.now && next <= h.now + 250 * MS,
        "{:?}",
        next - h.t0
    );
}

#[test]
fn a_replica_that_hangs_after_a_long_healthy_run_is_replaced_without_backoff() {
    let mut h = Harness::new(1);
    h.all_ready();
    for round in 0..3 {
        // Healthy for longer than reset_after (60 s), answering every probe.
        for _ in 0..250 {
            h.advance(250 * MS);
            h.answer(|_, _| true);
        }
        let hung = h.pid_of("replica-0");
        // Readiness fails first (out of rotation), then liveness: the healthy run still counts.
        h.advance(250 * MS);
        h.answer(|_, kind| kind != ProbeKind::Readiness);
        h.advance(250 * MS);
        h.answer(|_, kind| kind != ProbeKind::Readiness);
        assert!(h.ready().is_empty());
        for _ in 0..2 {
            h.advance(250 * MS);
            h.answer(|_, _| false);
        }
        let status = h.model.status(h.now);
        assert_eq!(status[0].restarts, round + 1);
        assert_ne!(
            h.pid_of("replica-0"),
            hung,
            "round {round}: the replacement started at once"
        );
        h.all_ready();
    }
}

impl Harness {
    /// Every process sent SIGTERM exits now (as a well-behaved replica does).
    fn stopped_ones_exit(&mut self) {
        let termed: Vec<u32> = self
            .signals()
            .into_iter()
            .filter(|(_, s)| *s == Signal::Term)
            .map(|(pid, _)| pid)
            .collect();
        self.log.retain(|a| !matches!(a, Action::Signal { .. }));
        for pid in termed {
            self.model.exited(pid, Cause::Signal(15), self.now);
        }
        self.settle();
    }

    fn revisions_started(&self) -> Vec<u64> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { revision, .. } => Some(*revision),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_rolling_update_starts_each_new_replica_before_an_old_one_leaves_and_never_drops_below_n_ready()
{
    let mut h = Harness::new(3);
    h.all_ready();
    h.log.clear();
    h.model.roll_out(1, h.now);
    h.settle();
    let mut spawned = Vec::new();
    for _ in 0..50 {
        spawned.extend(h.revisions_started());
        assert!(h.ready().len() >= 3, "ready {:?}", h.ready());
        assert!(
            h.model.status(h.now).len() <= 4,
            "at most one surge replica"
        );
        if h.model.settled_on(1) {
            break;
        }
        h.answer(|_, _| true);
        h.stopped_ones_exit();
        h.advance(250 * MS);
    }
    assert!(h.model.settled_on(1), "{:?}", h.model.status(h.now));
    assert_eq!(
        spawned,
        [1, 1, 1],
        "three new replicas, all of the new release"
    );
    assert!(h.model.revisions().iter().all(|(_, r)| *r == 1));
    assert_eq!(h.model.failures(1), None);
}

#[test]
fn a_new_release_that_crashes_is_counted_and_the_old_replicas_keep_serving() {
    let mut h = Harness::new(3);
    h.all_ready();
    h.model.roll_out(1, h.now);
    h.settle();
    let surge = h
        .model
        .status(h.now)
        .into_iter()
        .find(|r| r.id == "replica-3")
        .expect("a surge replica");
    h.model.exited(surge.pid.unwrap(), Cause::Exit(65), h.now);
    h.settle();
    let (count, last) = h.model.failures(1).expect("a failure of release 1");
    assert_eq!(*count, 1);
    assert!(last.contains("replica-3 exited with code 65"), "{last}");
    assert_eq!(h.ready(), ["replica-0", "replica-1", "replica-2"]);
    assert_eq!(
        h.model.scale(5, h.now),
        Err(crate::model::Refused::RolloutInProgress)
    );
    // Rolling back to release 0 removes the surge replica and touches no old one.
    h.model.roll_out(0, h.now);
    h.settle();
    h.stopped_ones_exit();
    assert!(h.model.settled_on(0), "{:?}", h.model.status(h.now));
    assert_eq!(h.ready(), ["replica-0", "replica-1", "replica-2"]);
}

#[test]
fn recreate_stops_every_replica_and_starts_none_until_resumed() {
    let mut h = Harness::new(2);
    h.all_ready();
    h.model.roll_out(1, h.now);
    h.settle();
    h.all_ready();
    h.stopped_ones_exit();
    h.all_ready();
    h.stopped_ones_exit();
    h.all_ready();
    assert!(h.model.settled_on(1));
    h.log.clear();
    h.model.recreate(0, h.now);
    h.settle();
    assert!(h.ready().is_empty(), "out of rotation at once");
    h.stopped_ones_exit();
    assert!(h.model.is_empty());
    h.advance(Duration::from_secs(1));
    assert!(
        h.revisions_started().is_empty(),
        "nothing starts while paused"
    );
    h.model.resume(h.now);
    h.settle();
    assert_eq!(h.revisions_started(), [0, 0]);
    h.all_ready();
    assert!(h.model.settled_on(0));
}

impl Harness {
    fn port_of(&self, replica: &str) -> u16 {
        let status = self.model.status(self.now);
        status
            .iter()
            .find(|r| r.id == replica)
            .and_then(|r| r.port)
            .expect("running")
    }

    /// The probes asked for since the log was last drained: (slot, kind).
    fn probes_asked(&self) -> Vec<(usize, ProbeKind)> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Probe { slot, kind, .. } => Some((*slot, *kind)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_replica_the_router_finds_silent_leaves_the_rotation_at_once_and_is_probed_now() {
    let mut h = Harness::new(3);
    h.all_ready();
    h.log.clear();
    let pid = h.pid_of("replica-1");
    let port = h.port_of("replica-1");
    h.advance(10 * MS);
    assert!(h.model.silent("replica-1", port, h.now));
    h.settle();
    assert_eq!(h.ready(), ["replica-0", "replica-2"]);
    assert_eq!(
        h.probes_asked(),
        [(1, ProbeKind::Readiness)],
        "one readiness probe at once, 240 ms before its period"
    );
    // The confirming probe times out: still out, not restarted (readiness never restarts).
    h.answer(|slot, _| slot != 1);
    assert_eq!(h.ready(), ["replica-0", "replica-2"]);
    assert!(h.signals().is_empty());
    assert!(
        h.model.settled_on(0),
        "an update's trial judges by the probes: one failure is below the threshold"
    );
    assert_eq!(h.pid_of("replica-1"), pid);
    // A later periodic probe that passes brings it back.
    h.advance(250 * MS);
    h.answer(|_, _| true);
    assert_eq!(h.ready(), ["replica-0", "replica-1", "replica-2"]);
    assert_eq!(h.pid_of("replica-1"), pid);
}

#[test]
fn a_slow_but_live_replica_is_brought_back_by_the_confirming_probe() {
    let mut h = Harness::new(2);
    h.all_ready();
    h.log.clear();
    let port = h.port_of("replica-0");
    assert!(h.model.silent("replica-0", port, h.now));
    h.settle();
    assert_eq!(h.ready(), ["replica-1"]);
    h.answer(|_, _| true);
    assert_eq!(h.ready(), ["replica-0", "replica-1"]);
    assert!(h.signals().is_empty());
}

#[test]
fn a_silence_report_about_another_process_or_one_out_of_rotation_changes_nothing() {
    let mut h = Harness::new(2);
    h.all_ready();
    h.log.clear();
    let port = h.port_of("replica-0");
    assert!(
        !h.model.silent("replica-0", port + 1000, h.now),
        "a replaced process"
    );
    assert!(!h.model.silent("replica-7", port, h.now), "no such slot");
    assert!(h.model.silent("replica-0", port, h.now));
    h.settle();
    assert!(!h.model.silent("replica-0", port, h.now), "already out");
    h.settle();
    assert_eq!(h.probes_asked().len(), 1, "a second report asks no probe");
    assert_eq!(h.ready(), ["replica-1"]);
}

#[test]
fn the_router_ejects_one_replica_at_a_time_and_never_the_last_in_rotation() {
    let mut alone = Harness::new(1);
    alone.all_ready();
    let port = alone.port_of("replica-0");
    assert!(
        !alone.model.silent("replica-0", port, alone.now),
        "the last one"
    );
    assert_eq!(alone.ready(), ["replica-0"]);

    let mut h = Harness::new(3);
    h.all_ready();
    h.log.clear();
    let (p0, p1) = (h.port_of("replica-0"), h.port_of("replica-1"));
    assert!(h.model.silent("replica-0", p0, h.now));
    h.settle();
    assert!(
        !h.model.silent("replica-1", p1, h.now),
        "one out on the router's word already: a shared stall empties nothing"
    );
    assert_eq!(h.ready(), ["replica-1", "replica-2"]);
    h.answer(|_, _| true);
    assert_eq!(h.ready(), ["replica-0", "replica-1", "replica-2"]);
    assert!(
        h.model.silent("replica-1", p1, h.now),
        "the first came back"
    );
}
