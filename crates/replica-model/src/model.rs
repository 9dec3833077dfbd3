//! The supervisor's state as a pure model: events come in with the time they happened,
//! actions come out. No I/O, no clock, no randomness of its own (the seed is injected), so
//! every transition is unit-tested without sleeping. The dispatcher (`supervisor.rs`) does the I/O.
//!
//! Each replica slot moves through [`Phase`]s (see `model.md` for the diagram). A process that
//! failed its liveness or startup probe is *retired*: taken out of rotation at once, sent
//! SIGTERM, SIGKILLed after a short grace, while the slot already starts its replacement.

use std::time::{Duration, Instant};

use edge_proto::{ExitInfo, ExitReason, ReplicaState, ReplicaStatus};

use crate::backoff::Backoff;
use crate::policy::{Probe, Probes, RestartPolicy};

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Liveness => "liveness",
            ProbeKind::Readiness => "readiness",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a process for `slot` from release `revision`; report with [`Model::spawned`].
    Spawn {
        slot: usize,
        generation: u64,
        revision: u64,
    },
    /// Probe a process; report with [`Model::probe_result`].
    Probe {
        slot: usize,
        generation: u64,
        kind: ProbeKind,
        port: u16,
    },
    /// Signal a replica's process group.
    Signal { pid: u32, signal: Signal },
}

/// Why a replica process ended or was replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    Exit(i32),
    Signal(i32),
    OomKill,
    Liveness(String),
    StartupTimeout(String),
    SpawnFailed(String),
    /// Asked to stop (scale down, restart command, shutdown).
    Stopped,
}

impl Cause {
    /// The label used in metrics and status.
    pub fn reason(&self) -> ExitReason {
        match self {
            Cause::Exit(_) => ExitReason::Exit,
            Cause::Signal(_) => ExitReason::Signal,
            Cause::OomKill => ExitReason::OomKill,
            Cause::Liveness(_) => ExitReason::Liveness,
            Cause::StartupTimeout(_) => ExitReason::StartupTimeout,
            Cause::SpawnFailed(_) => ExitReason::SpawnFailed,
            Cause::Stopped => ExitReason::Stopped,
        }
    }

    fn info(&self) -> ExitInfo {
        let (code, signal, detail) = match self {
            Cause::Exit(code) => (Some(*code), None, None),
            Cause::Signal(signal) => (None, Some(*signal), None),
            Cause::Liveness(d) | Cause::StartupTimeout(d) | Cause::SpawnFailed(d) => {
                (None, None, Some(d.clone()))
            }
            Cause::OomKill | Cause::Stopped => (None, None, None),
        };
        ExitInfo {
            reason: self.reason(),
            code,
            signal,
            detail,
        }
    }
}

/// One process started for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incarnation {
    pub generation: u64,
    pub pid: u32,
    pub port: u16,
    pub started: Instant,
}

/// Where a probe stands for one process.
#[derive(Debug, Clone)]
struct Track {
    next_at: Instant,
    in_flight: bool,
    successes: u32,
    failures: u32,
    /// The process said it is ready (see [`Model::notified`]); only the first word counts.
    told: bool,
    /// Told while a probe was in flight: if that one fails, probe again at once.
    again_at_once: bool,
}

impl Track {
    fn new(next_at: Instant) -> Self {
        Track {
            next_at,
            in_flight: false,
            successes: 0,
            failures: 0,
            told: false,
            again_at_once: false,
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// No process; the next one starts at `start_at` (backoff).
    Waiting { start_at: Instant },
    /// A spawn was requested and not yet reported.
    Spawning { generation: u64 },
    /// The startup probe has not passed yet; liveness and readiness wait for it.
    Starting { inc: Incarnation, startup: Track },
    /// Liveness and readiness probes run; `ready_since` (and not `silenced`) puts it in rotation.
    Running {
        inc: Incarnation,
        /// Ready by its readiness probe (what an update's trial judges).
        ready_since: Option<Instant>,
        /// Out of rotation on the router's word (see [`Model::silent`]) until a readiness probe
        /// passes, or fails often enough to take `ready_since` away.
        silenced: bool,
        /// When this process first became ready; kept when readiness later fails, because a
        /// long healthy run (not the current readiness) is what resets the restart backoff.
        first_ready: Option<Instant>,
        liveness: Option<Track>,
        readiness: Option<Track>,
    },
    /// Being stopped for good (scale down or shutdown): out of rotation, SIGTERM sent.
    Stopping {
        inc: Incarnation,
        kill_at: Instant,
        killed: bool,
    },
}

#[derive(Debug)]
struct Slot {
    index: usize,
    phase: Phase,
    restarts: u32,
    last_exit: Option<Cause>,
    backoff: Backoff,
    /// Scaled away: the slot disappears when its process has exited.
    removing: bool,
    /// The release this slot runs (see [`Model::roll_out`]).
    revision: u64,
}

/// A process replaced after a failed probe or a restart command, on its way out.
#[derive(Debug)]
struct Retiring {
    pid: u32,
    kill_at: Instant,
    killed: bool,
}

/// Timing the model needs from the configuration.
#[derive(Debug, Clone)]
pub struct Timing {
    pub probes: Probes,
    pub restart: RestartPolicy,
    pub stop_grace: Duration,
    pub hung_grace: Duration,
}

#[derive(Debug)]
pub struct Model {
    timing: Timing,
    /// Replicas wanted.
    replicas: u32,
    /// The release new replicas run; slots on another one are replaced by [`Model::roll_out`].
    revision: u64,
    /// Set by [`Model::recreate`]: no replica starts until [`Model::resume`].
    paused: bool,
    /// Failures (exits, failed liveness or startup probes, failed spawns) per release, with
    /// the last one's description: what the update agent judges a trial by.
    failures: std::collections::HashMap<u64, (u32, String)>,
    slots: Vec<Slot>,
    retiring: Vec<Retiring>,
    next_generation: u64,
    shutting_down: bool,
    rng: fastrand::Rng,
    actions: Vec<Action>,
}

/// A command the model refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("there is no replica {0}")]
    UnknownReplica(String),
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    #[error("an update is replacing the replicas; try again when it has finished")]
    RolloutInProgress,
}

pub fn replica_id(index: usize) -> String {
    format!("replica-{index}")
}

impl Model {
    /// `replicas` slots, all due to start at `now`.
    pub fn new(replicas: u32, timing: Timing, now: Instant, seed: u64) -> Self {
        let mut model = Model {
            timing,
            replicas: 0,
            revision: 0,
            paused: false,
            failures: std::collections::HashMap::new(),
            slots: Vec::new(),
            retiring: Vec::new(),
            next_generation: 1,
            shutting_down: false,
            rng: fastrand::Rng::with_seed(seed),
            actions: Vec::new(),
        };
        model.scale(replicas, now).expect("not shutting down yet");
        model
    }

    /// Actions produced since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Starts what is due, schedules due probes, escalates overdue stops to SIGKILL. One
    /// piece: one pass over the slots, one arm per phase, each a few lines.
    pub fn tick(&mut self, now: Instant) {
        self.roll(now);
        let timing = &self.timing;
        for slot in &mut self.slots {
            slot.backoff.refresh(now);
            match &mut slot.phase {
                Phase::Waiting { start_at } if *start_at <= now && !self.shutting_down => {
                    let generation = self.next_generation;
                    self.next_generation += 1;
                    slot.phase = Phase::Spawning { generation };
                    self.actions.push(Action::Spawn {
                        slot: slot.index,
                        generation,
                        revision: slot.revision,
                    });
                }
                Phase::Starting { inc, startup } => {
                    if let Some(probe) = &timing.probes.startup {
                        due(
                            &mut self.actions,
                            slot.index,
                            inc,
                            startup,
                            probe,
                            ProbeKind::Startup,
                            now,
                        );
                    }
                }
                Phase::Running {
                    inc,
                    liveness,
                    readiness,
                    ..
                } => {
                    if let (Some(track), Some(probe)) = (liveness, &timing.probes.liveness) {
                        due(
                            &mut self.actions,
                            slot.index,
                            inc,
                            track,
                            probe,
                            ProbeKind::Liveness,
                            now,
                        );
                    }
                    if let (Some(track), Some(probe)) = (readiness, &timing.probes.readiness) {
                        due(
                            &mut self.actions,
                            slot.index,
                            inc,
                            track,
                            probe,
                            ProbeKind::Readiness,
                            now,
                        );
                    }
                }
                Phase::Stopping {
                    inc,
                    kill_at,
                    killed,
                } if !*killed && *kill_at <= now => {
                    *killed = true;
                    self.actions.push(Action::Signal {
                        pid: inc.pid,
                        signal: Signal::Kill,
                    });
                }
                _ => {}
            }
        }
        for retiring in &mut self.retiring {
            if !retiring.killed && retiring.kill_at <= now {
                retiring.killed = true;
                self.actions.push(Action::Signal {
                    pid: retiring.pid,
                    signal: Signal::Kill,
                });
            }
        }
    }

    /// The driver started (or failed to start) the process asked for by [`Action::Spawn`].
    pub fn spawned(
        &mut self,
        slot: usize,
        generation: u64,
        result: Result<(u32, u16), String>,
        now: Instant,
    ) {
        let Some(s) = self.slot_mut(slot) else {
            if let Ok((pid, _)) = result {
                self.actions.push(Action::Signal {
                    pid,
                    signal: Signal::Kill,
                });
            }
            return;
        };
        let expected = matches!(s.phase, Phase::Spawning { generation: g } if g == generation);
        match result {
            Ok((pid, _)) if !expected || s.removing || self.shutting_down => {
                // Nobody wants this process any more.
                self.retire(pid, now, self.timing.stop_grace);
                if expected {
                    self.remove_or_wait(slot, now);
                }
            }
            Ok((pid, port)) => {
                let inc = Incarnation {
                    generation,
                    pid,
                    port,
                    started: now,
                };
                let phase = match &self.timing.probes.startup {
                    Some(probe) => Phase::Starting {
                        inc,
                        startup: Track::new(now + probe.initial_delay),
                    },
                    None => self.running(inc, now),
                };
                if let Some(s) = self.slot_mut(slot) {
                    s.phase = phase;
                }
            }
            Err(error) if expected => {
                self.restart_later(slot, Cause::SpawnFailed(error), Duration::ZERO, now)
            }
            Err(_) => {}
        }
        self.tick(now);
    }

    /// The process `pid` said it is ready (`READY=1` on the notify socket): its startup probe
    /// runs now instead of at the next period, or again at once if the one in flight fails.
    /// A hint, never trusted: the probe decides, and only a process's first word counts, so a
    /// chatty or lying sender costs at most one probe. Returns whether the word was taken.
    pub fn notified(&mut self, pid: u32, now: Instant) -> bool {
        let Some(startup) = self.slots.iter_mut().find_map(|s| match &mut s.phase {
            Phase::Starting { inc, startup } if inc.pid == pid && !startup.told => Some(startup),
            _ => None,
        }) else {
            return false;
        };
        startup.told = true;
        if startup.in_flight {
            startup.again_at_once = true;
        } else {
            startup.next_at = startup.next_at.min(now);
        }
        self.tick(now);
        true
    }

    /// The router saw `replica` on `port` leave a request unanswered for the
    /// readiness probe's timeout, while answering nothing else (see the router's in-band
    /// detection). Like Envoy's outlier detection it leaves the rotation at once, and like
    /// Envoy's `max_ejection_percent` the router's word ejects at most one replica at a time
    /// and never the last one in rotation: a stall they all share (the one database) cannot
    /// empty the rotation. The readiness probe decides when it comes back: one runs now
    /// (unless one is in flight, whose result then decides); a pass brings it back, failures
    /// count as usual. Its readiness as an update's trial sees it (`settled_on`) is the
    /// probes' alone, and only liveness restarts it. Returns whether the replica left the
    /// rotation; a report about a process that is not the slot's one in rotation (replaced,
    /// already out), or that the limits above refuse, changes nothing.
    pub fn silent(&mut self, replica: &str, port: u16, now: Instant) -> bool {
        let in_rotation = |phase: &Phase| {
            matches!(
                phase,
                Phase::Running {
                    ready_since: Some(_),
                    silenced: false,
                    ..
                }
            )
        };
        let silenced = |phase: &Phase| matches!(phase, Phase::Running { silenced: true, .. });
        if self.slots.iter().any(|s| silenced(&s.phase))
            || self.slots.iter().filter(|s| in_rotation(&s.phase)).count() < 2
        {
            return false;
        }
        let Some(s) = self
            .slots
            .iter_mut()
            .find(|s| !s.removing && replica_id(s.index) == replica)
        else {
            return false;
        };
        let Phase::Running {
            inc,
            ready_since: Some(_),
            silenced: silenced @ false,
            readiness: Some(track),
            ..
        } = &mut s.phase
        else {
            return false;
        };
        if inc.port != port {
            return false;
        }
        *silenced = true;
        if !track.in_flight {
            track.next_at = now;
        }
        self.tick(now);
        true
    }

    /// A replica process exited (`cause` is how: code, signal, OOM kill).
    pub fn exited(&mut self, pid: u32, cause: Cause, now: Instant) {
        if let Some(i) = self.retiring.iter().position(|r| r.pid == pid) {
            self.retiring.remove(i);
            self.tick(now);
            return;
        }
        let found = self.slots.iter().find_map(|s| match &s.phase {
            Phase::Starting { inc, .. } | Phase::Stopping { inc, .. } if inc.pid == pid => {
                Some((s.index, Duration::ZERO))
            }
            Phase::Running {
                inc, first_ready, ..
            } if inc.pid == pid => Some((
                s.index,
                first_ready.map_or(Duration::ZERO, |since| now.saturating_duration_since(since)),
            )),
            _ => None,
        });
        let Some((index, healthy_for)) = found else {
            return;
        };
        let stopping = self
            .slot(index)
            .is_some_and(|s| matches!(s.phase, Phase::Stopping { .. }));
        if stopping {
            if let Some(s) = self.slot_mut(index) {
                s.last_exit = Some(Cause::Stopped);
            }
            self.remove_or_wait(index, now);
        } else {
            self.restart_later(index, cause, healthy_for, now);
        }
        self.tick(now);
    }

    /// A probe finished: `Ok` for success, `Err` with what went wrong. One piece: the
    /// (phase, probe) table, one arm per probe kind, and its two consequences after it.
    pub fn probe_result(
        &mut self,
        slot: usize,
        generation: u64,
        kind: ProbeKind,
        outcome: Result<(), String>,
        now: Instant,
    ) {
        let probes = &self.timing.probes;
        let failures_allowed =
            |p: &Option<Probe>| p.as_ref().map_or(1, |p| p.failure_threshold.get());
        let startup_limit = failures_allowed(&probes.startup);
        let liveness_limit = failures_allowed(&probes.liveness);
        let readiness_limit = failures_allowed(&probes.readiness);
        let ready_after = probes
            .readiness
            .as_ref()
            .map_or(1, |p| p.success_threshold.get());
        let Some(s) = self.slot_mut(slot) else { return };
        let mut failed = None;
        let mut started = None;
        // How long the failing process had been in rotation: a long healthy run resets the backoff.
        let mut healthy_for = Duration::ZERO;
        match (&mut s.phase, kind) {
            (Phase::Starting { inc, startup }, ProbeKind::Startup)
                if inc.generation == generation =>
            {
                startup.in_flight = false;
                match outcome {
                    Ok(()) => started = Some(*inc),
                    Err(error) => {
                        startup.failures += 1;
                        if startup.failures >= startup_limit {
                            failed = Some((inc.pid, Cause::StartupTimeout(error)));
                        } else if std::mem::take(&mut startup.again_at_once) {
                            startup.next_at = now;
                        }
                    }
                }
            }
            (
                Phase::Running {
                    inc,
                    liveness: Some(track),
                    first_ready,
                    ..
                },
                ProbeKind::Liveness,
            ) if inc.generation == generation => {
                track.in_flight = false;
                match outcome {
                    Ok(()) => track.failures = 0,
                    Err(error) => {
                        track.failures += 1;
                        if track.failures >= liveness_limit {
                            healthy_for = first_ready.map_or(Duration::ZERO, |since| {
                                now.saturating_duration_since(since)
                            });
                            failed = Some((inc.pid, Cause::Liveness(error)));
                        }
                    }
                }
            }
            (
                Phase::Running {
                    inc,
                    ready_since,
                    silenced,
                    first_ready,
                    readiness: Some(track),
                    ..
                },
                ProbeKind::Readiness,
            ) if inc.generation == generation => {
                track.in_flight = false;
                match outcome {
                    Ok(()) => {
                        *silenced = false;
                        track.failures = 0;
                        track.successes += 1;
                        if ready_since.is_none() && track.successes >= ready_after {
                            *ready_since = Some(now);
                            first_ready.get_or_insert(now);
                        }
                    }
                    Err(_) => {
                        track.successes = 0;
                        track.failures += 1;
                        if ready_since.is_some() && track.failures >= readiness_limit {
                            *ready_since = None;
                            *silenced = false;
                        }
                    }
                }
            }
            _ => {}
        }
        if let Some(inc) = started {
            let phase = self.running(inc, now);
            if let Some(s) = self.slot_mut(slot) {
                s.phase = phase;
            }
        }
        if let Some((pid, cause)) = failed {
            // Out of rotation now; the process gets a short grace, the slot a replacement.
            let grace = self.timing.hung_grace;
            self.retire(pid, now, grace);
            self.restart_later(slot, cause, healthy_for, now);
        }
        self.tick(now);
    }

    /// Runs `replicas` slots: new ones start now, surplus ones (highest first) are stopped
    /// gracefully after leaving the rotation.
    pub fn scale(&mut self, replicas: u32, now: Instant) -> Result<(), Refused> {
        if self.shutting_down {
            return Err(Refused::ShuttingDown);
        }
        if self.rolling() {
            return Err(Refused::RolloutInProgress);
        }
        self.replicas = replicas;
        let mut active: Vec<usize> = self
            .slots
            .iter()
            .filter(|s| !s.removing)
            .map(|s| s.index)
            .collect();
        active.sort_unstable();
        let wanted = replicas as usize;
        let mut index = 0;
        while active.len() < wanted {
            if !self.slots.iter().any(|s| s.index == index) {
                self.add_slot(index, now);
                active.push(index);
            }
            index += 1;
        }
        while active.len() > wanted {
            let index = active.pop().expect("non-empty");
            self.stop_slot(index, now);
        }
        self.slots.sort_by_key(|s| s.index);
        self.tick(now);
        Ok(())
    }

    /// Replaces one replica: out of rotation, SIGTERM with the stop grace, and a successor
    /// started at once (no backoff: nothing failed).
    pub fn restart(&mut self, id: &str, now: Instant) -> Result<(), Refused> {
        if self.shutting_down {
            return Err(Refused::ShuttingDown);
        }
        let slot = self
            .slots
            .iter()
            .find(|s| !s.removing && replica_id(s.index) == id)
            .map(|s| s.index)
            .ok_or_else(|| Refused::UnknownReplica(id.to_owned()))?;
        let pid = match &self.slot(slot).map(|s| &s.phase) {
            Some(Phase::Starting { inc, .. } | Phase::Running { inc, .. }) => Some(inc.pid),
            _ => None,
        };
        if let Some(pid) = pid {
            let grace = self.timing.stop_grace;
            self.retire(pid, now, grace);
        }
        if let Some(s) = self.slot_mut(slot)
            && !matches!(s.phase, Phase::Spawning { .. })
        {
            s.phase = Phase::Waiting { start_at: now };
            s.last_exit = Some(Cause::Stopped);
        }
        self.tick(now);
        Ok(())
    }

    /// Stops everything: every replica leaves the rotation and gets SIGTERM, then SIGKILL
    /// after the stop grace. [`Model::is_finished`] turns true when all have exited.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        let indexes: Vec<usize> = self.slots.iter().map(|s| s.index).collect();
        for index in indexes {
            self.stop_slot(index, now);
        }
        self.tick(now);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    pub fn is_finished(&self) -> bool {
        self.shutting_down && self.slots.is_empty() && self.retiring.is_empty()
    }

    /// When the model next needs a [`Model::tick`], if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Instant| next = Some(next.map_or(at, |n| n.min(at)));
        for slot in &self.slots {
            match &slot.phase {
                Phase::Waiting { start_at } if !self.shutting_down => consider(*start_at),
                Phase::Starting { startup, .. } if !startup.in_flight => consider(startup.next_at),
                Phase::Running {
                    liveness,
                    readiness,
                    ..
                } => {
                    for track in [liveness, readiness].into_iter().flatten() {
                        if !track.in_flight {
                            consider(track.next_at);
                        }
                    }
                }
                Phase::Stopping {
                    kill_at,
                    killed: false,
                    ..
                } => consider(*kill_at),
                _ => {}
            }
        }
        for retiring in self.retiring.iter().filter(|r| !r.killed) {
            consider(retiring.kill_at);
        }
        next
    }

    /// Replicas in rotation: (replica id, port), in slot order.
    pub fn ready_backends(&self) -> Vec<(String, u16)> {
        self.slots
            .iter()
            .filter_map(|s| match &s.phase {
                Phase::Running {
                    inc,
                    ready_since: Some(_),
                    silenced: false,
                    ..
                } => Some((replica_id(s.index), inc.port)),
                _ => None,
            })
            .collect()
    }

    /// Replicas wanted.
    pub fn desired(&self) -> u32 {
        self.replicas
    }

    /// Replaces every replica not on `revision` by one that is, one at a time: a new replica
    /// starts beside the old ones, and only when it is ready does an old one leave the
    /// rotation and stop (Kubernetes' rolling update with maxSurge 1, maxUnavailable 0).
    pub fn roll_out(&mut self, revision: u64, now: Instant) {
        self.revision = revision;
        self.paused = false;
        self.tick(now);
    }

    /// Stops every replica and starts none until [`Model::resume`], which starts them on
    /// `revision` (Kubernetes' Recreate strategy: for a rollback whose database must be
    /// restored while nothing uses it).
    pub fn recreate(&mut self, revision: u64, now: Instant) {
        self.revision = revision;
        self.paused = true;
        let indexes: Vec<usize> = self.slots.iter().map(|s| s.index).collect();
        for index in indexes {
            self.stop_slot(index, now);
        }
        self.tick(now);
    }

    /// Starts the replicas again after [`Model::recreate`].
    pub fn resume(&mut self, now: Instant) {
        self.paused = false;
        let _ = self.scale(self.replicas, now);
    }

    /// No process is left (after [`Model::recreate`], or when shutting down).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.retiring.is_empty()
    }

    /// Every wanted replica runs `revision`, is ready, and nothing else runs.
    pub fn settled_on(&self, revision: u64) -> bool {
        !self.paused
            && self.revision == revision
            && self.slots.len() == self.replicas as usize
            && self.slots.iter().all(|s| {
                !s.removing
                    && s.revision == revision
                    && matches!(
                        s.phase,
                        Phase::Running {
                            ready_since: Some(_),
                            ..
                        }
                    )
            })
    }

    /// How often replicas of `revision` failed, and the last failure.
    pub fn failures(&self, revision: u64) -> Option<&(u32, String)> {
        self.failures.get(&revision)
    }

    /// The release of each slot: (replica id, revision).
    pub fn revisions(&self) -> Vec<(String, u64)> {
        self.slots
            .iter()
            .map(|s| (replica_id(s.index), s.revision))
            .collect()
    }

    /// A rollout is under way: some wanted slot runs another release.
    fn rolling(&self) -> bool {
        self.slots
            .iter()
            .any(|s| !s.removing && s.revision != self.revision)
    }

    /// One step of a rolling update (see [`Model::roll_out`]).
    fn roll(&mut self, now: Instant) {
        if self.shutting_down || self.paused || !self.rolling() {
            return;
        }
        let live: Vec<&Slot> = self.slots.iter().filter(|s| !s.removing).collect();
        let ready = |s: &&Slot| {
            matches!(
                s.phase,
                Phase::Running {
                    ready_since: Some(_),
                    ..
                }
            )
        };
        let pending_new = live
            .iter()
            .filter(|s| s.revision == self.revision && !ready(s))
            .count();
        if live.len() > self.replicas as usize {
            if pending_new == 0 {
                // The surge replica is ready: an old one goes, an unready one first.
                let old = live
                    .iter()
                    .filter(|s| s.revision != self.revision)
                    .min_by_key(|s| (ready(s), std::cmp::Reverse(s.index)))
                    .map(|s| s.index);
                if let Some(index) = old {
                    self.stop_slot(index, now);
                }
            }
        } else {
            let mut index = 0;
            while self.slots.iter().any(|s| s.index == index) {
                index += 1;
            }
            self.add_slot(index, now);
            self.slots.sort_by_key(|s| s.index);
        }
    }

    fn add_slot(&mut self, index: usize, now: Instant) {
        self.slots.push(Slot {
            index,
            phase: Phase::Waiting { start_at: now },
            restarts: 0,
            last_exit: None,
            backoff: Backoff::new(self.timing.restart.clone()),
            removing: false,
            revision: self.revision,
        });
    }

    /// The slot a pid belongs to, if it is a slot's current process.
    pub fn slot_of(&self, pid: u32) -> Option<usize> {
        self.slots.iter().find_map(|s| match &s.phase {
            Phase::Starting { inc, .. }
            | Phase::Running { inc, .. }
            | Phase::Stopping { inc, .. }
                if inc.pid == pid =>
            {
                Some(s.index)
            }
            _ => None,
        })
    }

    /// Whether a slot by this id exists.
    pub fn has_replica(&self, id: &str) -> bool {
        self.slots.iter().any(|s| replica_id(s.index) == id)
    }

    /// The per-replica part of `status --json`.
    pub fn status(&self, now: Instant) -> Vec<ReplicaStatus> {
        self.slots
            .iter()
            .map(|s| {
                let (state, inc, ready) = match &s.phase {
                    Phase::Waiting { .. } | Phase::Spawning { .. } => {
                        (ReplicaState::Waiting, None, false)
                    }
                    Phase::Starting { inc, .. } => (ReplicaState::Starting, Some(inc), false),
                    Phase::Running {
                        inc,
                        ready_since,
                        silenced,
                        ..
                    } => (
                        ReplicaState::Running,
                        Some(inc),
                        ready_since.is_some() && !silenced,
                    ),
                    Phase::Stopping { inc, .. } => (ReplicaState::Stopping, Some(inc), false),
                };
                let next_start_in_seconds = match &s.phase {
                    Phase::Waiting { start_at } => {
                        Some(start_at.saturating_duration_since(now).as_secs_f64())
                    }
                    _ => None,
                };
                ReplicaStatus {
                    id: replica_id(s.index),
                    pid: inc.map(|i| i.pid),
                    port: inc.map(|i| i.port),
                    state,
                    ready,
                    restarts: s.restarts,
                    last_exit: s.last_exit.as_ref().map(Cause::info),
                    crash_looping: s.backoff.crash_looping(),
                    next_start_in_seconds,
                    release: None,
                }
            })
            .collect()
    }

    fn slot(&self, index: usize) -> Option<&Slot> {
        self.slots.iter().find(|s| s.index == index)
    }

    fn slot_mut(&mut self, index: usize) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.index == index)
    }

    /// The phase after a successful start: readiness is probed at once (a new replica should
    /// take traffic as soon as it can), liveness after one period.
    fn running(&self, inc: Incarnation, now: Instant) -> Phase {
        let probes = &self.timing.probes;
        let after_delay = |p: &Probe, first: Instant| first.max(inc.started + p.initial_delay);
        Phase::Running {
            inc,
            ready_since: probes.readiness.is_none().then_some(now),
            silenced: false,
            first_ready: probes.readiness.is_none().then_some(now),
            liveness: probes
                .liveness
                .as_ref()
                .map(|p| Track::new(after_delay(p, now + p.period))),
            readiness: probes
                .readiness
                .as_ref()
                .map(|p| Track::new(after_delay(p, now))),
        }
    }

    /// Sends SIGTERM to a process leaving its slot, and SIGKILL after `grace`.
    fn retire(&mut self, pid: u32, now: Instant, grace: Duration) {
        self.actions.push(Action::Signal {
            pid,
            signal: Signal::Term,
        });
        self.retiring.push(Retiring {
            pid,
            kill_at: now + grace,
            killed: false,
        });
    }

    /// Counts a failure and schedules the slot's next start after its backoff.
    fn restart_later(&mut self, index: usize, cause: Cause, healthy_for: Duration, now: Instant) {
        let random = self.rng.f64();
        let shutting_down = self.shutting_down;
        let Some(s) = self.slot_mut(index) else {
            return;
        };
        s.restarts += 1;
        let revision = s.revision;
        let described = match &cause {
            Cause::Exit(code) => format!("{} exited with code {code}", replica_id(index)),
            Cause::Signal(signal) => format!("{} was killed by signal {signal}", replica_id(index)),
            other => format!(
                "{} failed: {}{}",
                replica_id(index),
                other.reason(),
                other
                    .info()
                    .detail
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ),
        };
        let s = self.slot_mut(index).expect("found above");
        s.last_exit = Some(cause);
        if s.removing || shutting_down {
            self.remove_or_wait(index, now);
            return;
        }
        let delay = s.backoff.next_delay(now, healthy_for, random);
        let failures = self.failures.entry(revision).or_insert((0, String::new()));
        failures.0 += 1;
        failures.1 = described;
        let Some(s) = self.slot_mut(index) else {
            return;
        };
        s.phase = Phase::Waiting {
            start_at: now + delay,
        };
    }

    /// Stops a slot for good: a slot without a process goes at once; one with a process
    /// leaves the rotation, gets SIGTERM, and goes when it has exited.
    fn stop_slot(&mut self, index: usize, now: Instant) {
        let grace = self.timing.stop_grace;
        let Some(s) = self.slot_mut(index) else {
            return;
        };
        s.removing = true;
        match &s.phase {
            Phase::Waiting { .. } => self.remove_or_wait(index, now),
            Phase::Spawning { .. } | Phase::Stopping { .. } => {}
            Phase::Starting { inc, .. } | Phase::Running { inc, .. } => {
                let inc = *inc;
                s.phase = Phase::Stopping {
                    inc,
                    kill_at: now + grace,
                    killed: false,
                };
                self.actions.push(Action::Signal {
                    pid: inc.pid,
                    signal: Signal::Term,
                });
            }
        }
    }

    /// A slot that is being removed goes; any other waits for its next start.
    fn remove_or_wait(&mut self, index: usize, now: Instant) {
        let remove = self.shutting_down || self.slot(index).is_some_and(|s| s.removing);
        if remove {
            self.slots.retain(|s| s.index != index);
        } else if let Some(s) = self.slot_mut(index) {
            s.phase = Phase::Waiting { start_at: now };
        }
    }
}

/// Emits a probe when it is due and none is in flight; periods count from each probe's start.
fn due(
    actions: &mut Vec<Action>,
    slot: usize,
    inc: &Incarnation,
    track: &mut Track,
    probe: &Probe,
    kind: ProbeKind,
    now: Instant,
) {
    if track.in_flight || track.next_at > now {
        return;
    }
    track.in_flight = true;
    track.next_at = now + probe.period;
    actions.push(Action::Probe {
        slot,
        generation: inc.generation,
        kind,
        port: inc.port,
    });
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
