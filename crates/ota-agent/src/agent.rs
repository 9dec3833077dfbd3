//! The OTA agent, linked into the supervisor: verify a bundle, install it in the inactive slot,
//! snapshot the database, switch, roll the replicas over one at a time, try the new release,
//! then commit, or roll back with the database restored and the trial's quotes exported.
//! (`agent.md` has the diagram.)
//!
//! The dispatcher owns the [`Agent`] and calls it on every step; slow work (verifying and
//! writing a bundle, the database snapshot and restore, health commands, inbox scans) runs on
//! blocking tasks that report back as [`OtaEvent`]s. The slot state (`ota-slots`) is saved
//! before each step that depends on it, so that after a power cut at any instant the agent
//! starts from a consistent slot: an interrupted install is abandoned (the bundle is offered
//! again), an interrupted trial is tried again, up to `max_trial_boots`, then rolled back.
//!
//! Architecture invariant: the agent never writes a byte to a slot that `ota_bundle` has not
//! verified against the signed manifest; it checks the product, the anti-rollback floor and
//! the free space before the slot is touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_proto::{Progress, UpdateOutcome, UpdateResult, UpdateState, UpdateStatus};
use ota_slots::{Journal, Outcome, RealFs, Release, SlotName, State, StateFile, failpoint};

use crate::database::{
    DatabaseError, HealthError, ReleaseCommand, restore_database, snapshot_database,
};
use crate::inbox::{expand_inboxes, scan_inboxes};
use crate::install::Install;
use crate::settings::Settings;
use crate::trust::accept_keysets;

/// The agent's files under the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<data_dir>/ota`: `state.json`, `slots/{a,b}/`, `snapshot/quotes.db`, `rollback/`,
    /// `receipts/`, `inbox/`, `device.key`.
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Layout {
        Layout {
            dir: data_dir.join("ota"),
        }
    }
    pub fn slot(&self, slot: SlotName) -> PathBuf {
        self.dir.join("slots").join(slot.as_str())
    }
    /// The verified manifest of the release in `slot`, kept for delta installs.
    pub fn manifest(&self, slot: SlotName) -> PathBuf {
        self.dir
            .join("slots")
            .join(format!("{}.manifest", slot.as_str()))
    }
    pub fn snapshot(&self) -> PathBuf {
        self.dir.join("snapshot").join("quotes.db")
    }

    /// The slot state file, created with its directory on first use, and the state in it.
    pub(crate) fn open_state(&self) -> Result<(StateFile, State), UpdateError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| {
            UpdateError::State(ota_slots::StateError::Save {
                path: self.dir.clone(),
                step: "create the OTA directory",
                source,
            })
        })?;
        let file = StateFile::new(&self.dir);
        let state = file.load()?;
        Ok((file, state))
    }
}

/// Where a release's programs are: the factory's in `factory_bin` (by default next to the
/// supervisor), a slot's in its `bin/`.
pub fn release_dir(release: Release, layout: &Layout, factory_bin: &Path) -> PathBuf {
    match release {
        Release::Factory => factory_bin.to_owned(),
        Release::Slot(slot) => layout.slot(slot).join("bin"),
    }
}

/// Why an update did not go ahead; the running release is untouched.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("cannot read the bundle {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the trusted keys: {0}")]
    Keys(#[source] ota_bundle::BundleError),
    #[error("the bundle {path} is refused: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: ota_bundle::BundleError,
    },
    #[error("the bundle is for product {found:?}, this device is {expected:?}")]
    Incompatible { found: String, expected: String },
    #[error(
        "downgrade refused: the bundle has security version {found}, the device has committed {floor}; \
         installing it needs a downgrade permit for device {device} next to the bundle"
    )]
    Downgrade {
        found: u64,
        floor: u64,
        device: String,
    },
    #[error(
        "replay refused: the bundle was issued at {found}, before the committed release of the same security version ({floor})"
    )]
    Replay { found: u64, floor: u64 },
    #[error("version {0} is already running")]
    AlreadyRunning(String),
    #[error(
        "the bundle is a delta against release {base}, but this device runs {running}: use the full bundle"
    )]
    Delta { base: String, running: String },
    #[error("the release needs {needed} bytes in {path}, {free} are free; nothing was written")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error(transparent)]
    State(#[from] ota_slots::StateError),
    #[error(transparent)]
    Refused(#[from] ota_slots::Refused),
    #[error("installing into slot {slot} failed: {reason}")]
    Install { slot: &'static str, reason: String },
}

/// An install asked for while an update is in progress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an update is already in progress ({phase})")]
pub struct NotIdle {
    /// The phase the agent is in.
    pub phase: UpdateState,
}

/// A bundle written to a slot and marked ready.
#[derive(Debug, Clone)]
pub struct Installed {
    pub slot: SlotName,
    /// Bytes found already written and intact (an interrupted install resumed), not rewritten.
    pub resumed: u64,
    pub version: String,
    pub issued_at: u64,
    pub bundle: PathBuf,
    pub bytes: u64,
    /// Bytes the slot already held (its older release): compared, not written again.
    pub unchanged: u64,
    /// From opening the bundle to the slot marked ready (verify, write, fsync).
    pub took: Duration,
}

/// Results of the agent's blocking tasks, delivered to the dispatcher.
#[derive(Debug)]
pub enum OtaEvent {
    /// An inbox scan found bundles worth offering, best first.
    Found(Vec<PathBuf>),
    Installed(Box<(State, Result<Installed, UpdateError>)>),
    Snapshotted(Result<(), DatabaseError>),
    HealthChecked(Result<(), HealthError>),
    Restored(Result<(), DatabaseError>),
}

/// What the agent is doing.
#[derive(Debug)]
pub enum Phase {
    Idle,
    Installing {
        bundle: PathBuf,
    },
    Snapshotting {
        installed: Installed,
    },
    /// Replicas are being replaced by the new release (`revision`); the trial clock starts
    /// when all of them are ready.
    Trial {
        revision: u64,
        version: String,
        issued_at: u64,
        bundle: Option<PathBuf>,
        deadline: Instant,
        healthy_since: Option<Instant>,
    },
    Checking {
        version: String,
        issued_at: u64,
        bundle: Option<PathBuf>,
    },
    /// Every replica is being stopped (`draining`), then the database restored, then the
    /// previous release started.
    RollingBack {
        reason: String,
        version: String,
        bundle: Option<PathBuf>,
        draining: bool,
    },
}

impl Phase {
    /// The phase as `status` shows it.
    fn state(&self) -> UpdateState {
        match self {
            Phase::Idle => UpdateState::Idle,
            Phase::Installing { .. } => UpdateState::Installing,
            Phase::Snapshotting { .. } => UpdateState::Snapshotting,
            Phase::Trial {
                healthy_since: None,
                ..
            } => UpdateState::RollingOut,
            Phase::Trial { .. } => UpdateState::Trial,
            Phase::Checking { .. } => UpdateState::Checking,
            Phase::RollingBack { .. } => UpdateState::RollingBack,
        }
    }
}

/// The agent's state, owned by the dispatcher.
#[derive(Debug)]
pub struct Agent {
    layout: Layout,
    settings: Settings,
    state: State,
    phase: Phase,
    /// Runs a release's database tool the way the supervisor runs the release.
    release_command: ReleaseCommand,
    file: StateFile,
    progress: Arc<(AtomicU64, AtomicU64)>,
    /// Release of each model revision (revision 0 is what ran at start).
    releases: HashMap<u64, Release>,
    next_revision: u64,
    /// Bundles already taken (by path, size and mtime): an inbox scan does not offer an
    /// unchanged file again, so a refused bundle is not refused every scan.
    judged: HashMap<PathBuf, (u64, SystemTime)>,
    scanning: bool,
    started_at: u64,
    /// The last bundle refused before its slot was touched (not in the slot state, which
    /// records only what happened to slots); cleared by the next install.
    refusal: Option<UpdateResult>,
    /// Bytes the last install found intact from an interrupted one (for its receipt).
    resumed: u64,
    /// Bytes the last install found already in the slot (for its receipt).
    unchanged: u64,
}

/// What the dispatcher must do for the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    None,
    /// Start replacing the replicas with this revision.
    RollOut(u64),
    /// Stop every replica (rollback), starting none until [`Step::Resume`].
    Recreate(u64),
    Resume,
}

impl Agent {
    /// Loads the slot state and settles what a power cut or crash interrupted: an install is
    /// abandoned; a trial is counted, and rolled back when it has taken too many starts (the
    /// database is restored before the previous release runs again).
    pub fn open(
        layout: Layout,
        settings: Settings,
        release_command: ReleaseCommand,
    ) -> Result<Agent, UpdateError> {
        let (file, mut state) = layout.open_state()?;
        let mut journal = Journal::new(&layout.dir);
        let resumable = journal.read().filter(|mark| {
            let info = state.slot(mark.slot);
            info.status == ota_slots::SlotStatus::Installing
                && info.bundle_digest.as_deref() == Some(mark.digest.as_str())
        });
        for slot in [SlotName::A, SlotName::B] {
            if let Some(mark) = resumable.as_ref().filter(|m| m.slot == slot) {
                tracing::warn!(
                    slot = slot.as_str(),
                    file = mark.file,
                    chunk = mark.chunk,
                    "an install was interrupted; it resumes when its bundle is offered again"
                );
                continue;
            }
            if state.slot(slot).status == ota_slots::SlotStatus::Installing {
                tracing::warn!(
                    slot = slot.as_str(),
                    "an install was interrupted; the slot is emptied and the bundle will be offered again"
                );
                state = file.save(&mut RealFs, &state.abandon_install(slot)?)?;
            }
        }
        if resumable.is_none() {
            let _ = journal.clear();
        }
        let mut phase = Phase::Idle;
        if let Some(trial) = state.trial.clone() {
            let next = state.restart_trial()?;
            state = file.save(&mut RealFs, &next)?;
            let version = state.slot(trial.slot).version.clone().unwrap_or_default();
            if trial.attempts + 1 >= settings.max_trial_boots {
                let reason = format!(
                    "release {version} was on trial through {} supervisor starts",
                    trial.attempts + 1
                );
                tracing::error!(%reason, "rolling back at start");
                let previous = state.previous.unwrap_or(Release::Factory);
                let dir = release_dir(previous, &layout, &settings.factory_bin);
                if let Err(error) = restore_database(&layout, &release_command, &dir) {
                    tracing::error!(%error, "the database could not be restored from the snapshot");
                }
                state = file.save(&mut RealFs, &state.rollback(&reason)?)?;
            } else {
                tracing::warn!(%version, attempt = trial.attempts + 1, "the supervisor restarted during a trial: trying again");
                phase = Phase::Trial {
                    revision: 0,
                    version,
                    issued_at: 0,
                    bundle: None,
                    deadline: Instant::now() + settings.trial_deadline,
                    healthy_since: None,
                };
            }
        }
        let releases = HashMap::from([(0, state.active)]);
        Ok(Agent {
            layout,
            settings,
            state,
            phase,
            release_command,
            file,
            progress: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
            releases,
            next_revision: 1,
            judged: HashMap::new(),
            scanning: false,
            started_at: unix_now(),
            refusal: None,
            resumed: 0,
            unchanged: 0,
        })
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle)
    }

    /// The version of the release running now (`factory` for the one shipped with the device).
    pub fn running_version(&self) -> String {
        self.version_of(self.state.active)
    }

    /// The version of the release a model revision runs, if the agent gave that revision out.
    pub fn version_of_revision(&self, revision: u64) -> Option<String> {
        self.releases.get(&revision).map(|r| self.version_of(*r))
    }

    /// The directory of the programs a model revision runs (`{release}` in the service
    /// command); an unknown revision runs the active release.
    pub fn release_dir_of(&self, revision: u64) -> PathBuf {
        let release = self
            .releases
            .get(&revision)
            .copied()
            .unwrap_or(self.state.active);
        release_dir(release, &self.layout, &self.settings.factory_bin)
    }

    /// The version of a release, `factory` for the one shipped with the device.
    fn version_of(&self, release: Release) -> String {
        match release {
            Release::Factory => "factory".to_owned(),
            Release::Slot(slot) => self
                .state
                .slot(slot)
                .version
                .clone()
                .unwrap_or_else(|| "unknown".to_owned()),
        }
    }

    /// `status --json`'s `update`.
    pub fn status(&self) -> UpdateStatus {
        let target = match &self.phase {
            Phase::Idle => None,
            Phase::Installing { bundle } => Some(bundle.display().to_string()),
            Phase::Snapshotting { installed } => Some(installed.version.clone()),
            Phase::Trial { version, .. }
            | Phase::Checking { version, .. }
            | Phase::RollingBack { version, .. } => Some(version.clone()),
        };
        let progress = matches!(self.phase, Phase::Installing { .. }).then(|| Progress {
            done: self.progress.0.load(Ordering::Relaxed),
            total: self.progress.1.load(Ordering::Relaxed),
        });
        UpdateStatus {
            version: self.version_of(self.state.active),
            slot: match self.state.active {
                Release::Factory => None,
                Release::Slot(slot) => Some(slot.as_str().to_owned()),
            },
            state: self.phase.state(),
            target,
            progress,
            last_result: self.refusal.clone().or_else(|| {
                self.state.last_result.as_ref().map(|o| match o {
                    Outcome::Committed { version } => UpdateResult {
                        result: UpdateOutcome::Committed,
                        version: version.clone(),
                        reason: None,
                    },
                    Outcome::RolledBack { version, reason } => UpdateResult {
                        result: UpdateOutcome::RolledBack,
                        version: version.clone(),
                        reason: Some(reason.clone()),
                    },
                    Outcome::InstallFailed { version, reason } => UpdateResult {
                        result: UpdateOutcome::InstallFailed,
                        version: version.clone(),
                        reason: Some(reason.clone()),
                    },
                })
            }),
            security_version: self.state.highest_security_version,
        }
    }

    /// Starts installing `bundle` on a blocking task; refused unless idle.
    pub fn start_install(
        &mut self,
        bundle: PathBuf,
        trusted_keys: PathBuf,
        done: impl FnOnce(OtaEvent) + Send + 'static,
    ) -> Result<(), NotIdle> {
        if !self.is_idle() {
            return Err(NotIdle {
                phase: self.phase.state(),
            });
        }
        // Only the bundle taken is judged: the other candidates of the same scan stay on offer.
        if let Ok(meta) = std::fs::metadata(&bundle) {
            self.judged.insert(
                bundle.clone(),
                (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)),
            );
        }
        self.phase = Phase::Installing {
            bundle: bundle.clone(),
        };
        self.refusal = None;
        self.resumed = 0;
        self.unchanged = 0;
        self.started_at = unix_now();
        self.progress.0.store(0, Ordering::Relaxed);
        self.progress.1.store(0, Ordering::Relaxed);
        let job = Install {
            bundle,
            trusted_keys,
            product: self.settings.product.clone(),
            layout: self.layout.clone(),
            file: self.file.clone(),
            state: self.state.clone(),
            progress: Arc::clone(&self.progress),
        };
        tokio::task::spawn_blocking(move || {
            let (state, result) = job.run();
            done(OtaEvent::Installed(Box::new((state, result))));
        });
        Ok(())
    }

    /// The install finished: on success the database snapshot comes next, by the running
    /// release, on a blocking task that reports [`OtaEvent::Snapshotted`] to `done`.
    pub fn installed(
        &mut self,
        state: State,
        result: Result<Installed, UpdateError>,
        done: impl FnOnce(OtaEvent) + Send + 'static,
    ) {
        self.state = state;
        match result {
            Ok(installed) => {
                self.resumed = installed.resumed;
                self.unchanged = installed.unchanged;
                tracing::info!(version = %installed.version, slot = installed.slot.as_str(), bytes = installed.bytes, unchanged = installed.unchanged, resumed = installed.resumed, took_ms = installed.took.as_millis() as u64, "release installed; taking a database snapshot");
                self.phase = Phase::Snapshotting { installed };
                let layout = self.layout.clone();
                let command = self.release_command.clone();
                let dir = release_dir(self.state.active, &self.layout, &self.settings.factory_bin);
                tokio::task::spawn_blocking(move || {
                    done(OtaEvent::Snapshotted(snapshot_database(
                        &layout, &command, &dir,
                    )));
                });
            }
            Err(error) => {
                tracing::error!(%error, "update refused");
                if let Phase::Installing { bundle } = &self.phase {
                    if matches!(error, UpdateError::Install { .. }) {
                        // Stopped while writing: a bundle to blame is in failed_bundles (never
                        // offered again); one that is not (the stick was pulled) is offered again.
                        self.judged.remove(bundle);
                    }
                    self.write_receipt(Some(bundle), "refused", None, &error.to_string());
                    if !matches!(error, UpdateError::Install { .. }) {
                        self.refusal = Some(UpdateResult {
                            result: UpdateOutcome::Refused,
                            version: bundle.display().to_string(),
                            reason: Some(error.to_string()),
                        });
                    }
                }
                self.phase = Phase::Idle;
            }
        }
    }

    /// The snapshot is taken (or failed): switch, and roll out the new release.
    pub fn snapshotted(&mut self, result: Result<(), DatabaseError>, now: Instant) -> Step {
        let Some(Phase::Snapshotting { installed }) =
            self.take_phase("snapshotted", |p| matches!(p, Phase::Snapshotting { .. }))
        else {
            return Step::None;
        };
        failpoint::hit("agent.snapshotted");
        if let Err(error) = result {
            tracing::error!(%error, "no database snapshot, so no update: the slot stays installed but unused");
            return Step::None;
        }
        let next = match self.state.switch(installed.slot) {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, "cannot switch");
                return Step::None;
            }
        };
        match self.file.save(&mut RealFs, &next) {
            Ok(saved) => self.state = saved,
            Err(error) => {
                tracing::error!(%error, "cannot record the switch; the update is not started");
                return Step::None;
            }
        }
        let revision = self.next_revision;
        self.next_revision += 1;
        self.releases
            .insert(revision, Release::Slot(installed.slot));
        tracing::info!(version = %installed.version, slot = installed.slot.as_str(), "switched; replacing the replicas one at a time");
        self.phase = Phase::Trial {
            revision,
            version: installed.version,
            issued_at: installed.issued_at,
            bundle: Some(installed.bundle),
            deadline: now + self.settings.trial_deadline,
            healthy_since: None,
        };
        Step::RollOut(revision)
    }

    /// Judges the trial from the model's view: `settled` (every replica of the new release
    /// ready), and the new release's failures. Returns the health commands to run when the
    /// trial time has passed.
    pub fn watch(
        &mut self,
        settled: impl Fn(u64) -> bool,
        failures: impl Fn(u64) -> Option<String>,
        now: Instant,
    ) -> (Step, bool) {
        let Phase::Trial {
            revision,
            version,
            deadline,
            healthy_since,
            issued_at,
            bundle,
        } = &mut self.phase
        else {
            return (Step::None, false);
        };
        let revision = *revision;
        let reason = if let Some(failure) = failures(revision) {
            Some(format!("a replica of the new release failed: {failure}"))
        } else if now >= *deadline {
            Some(format!(
                "the new release was not ready and stable within {:?}",
                self.settings.trial_deadline
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            let (version, bundle) = (version.clone(), bundle.clone());
            return (self.roll_back(reason, version, bundle), false);
        }
        if !settled(revision) {
            *healthy_since = None;
            return (Step::None, false);
        }
        if healthy_since.is_none() {
            failpoint::hit("agent.rolled_out");
        }
        let since = *healthy_since.get_or_insert(now);
        if now.saturating_duration_since(since) < self.settings.trial {
            return (Step::None, false);
        }
        self.phase = Phase::Checking {
            version: version.clone(),
            issued_at: *issued_at,
            bundle: bundle.clone(),
        };
        (Step::None, true)
    }

    /// When [`Agent::watch`] needs to look again (the trial time running out, the deadline).
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Trial {
                deadline,
                healthy_since,
                ..
            } => Some(healthy_since.map_or(*deadline, |since| {
                (since + self.settings.trial).min(*deadline)
            })),
            _ => None,
        }
    }

    /// Health commands finished: commit, or roll back.
    pub fn health_checked(&mut self, result: Result<(), HealthError>) -> Step {
        let Some(Phase::Checking {
            version,
            issued_at,
            bundle,
        }) = self.take_phase("health_checked", |p| matches!(p, Phase::Checking { .. }))
        else {
            return Step::None;
        };
        if let Err(reason) = result {
            return self.roll_back(
                format!("a health command failed: {reason}"),
                version,
                bundle,
            );
        }
        failpoint::hit("agent.checked");
        let issued_at = if issued_at == 0 {
            self.trial_issued_at()
        } else {
            issued_at
        };
        let next = self.state.commit(issued_at);
        match self.persist(next) {
            Ok(()) => {
                tracing::info!(%version, "update committed");
                self.write_receipt(bundle.as_deref(), "committed", Some(&version), "");
            }
            Err(error) => {
                // Not committed: the next start retries the trial, as after a power cut.
                tracing::error!(%error, "cannot record the commit");
            }
        }
        Step::None
    }

    /// Takes the phase out when `expected` holds for it, leaving `Idle` for the caller to
    /// replace; otherwise the phase stays as it is and the stray event is reported: an event
    /// that does not belong to the phase never erases it (a trial, a rollback).
    fn take_phase(
        &mut self,
        event: &'static str,
        expected: impl Fn(&Phase) -> bool,
    ) -> Option<Phase> {
        if expected(&self.phase) {
            return Some(std::mem::replace(&mut self.phase, Phase::Idle));
        }
        tracing::warn!(
            event,
            phase = %self.phase.state(),
            "an OTA event that does not belong to this phase: ignored"
        );
        None
    }

    /// Saves the state a verb produced (temporary file, fsync, rename) and adopts it.
    fn persist(&mut self, next: Result<State, ota_slots::Refused>) -> Result<(), UpdateError> {
        self.state = self.file.save(&mut RealFs, &next?)?;
        Ok(())
    }

    fn trial_issued_at(&self) -> u64 {
        // After a restart the trial's issue time is not in memory; it is not needed for the
        // floor unless it equals the committed security version, and then 0 keeps the floor.
        self.state.highest_issued_at
    }

    fn roll_back(&mut self, reason: String, version: String, bundle: Option<PathBuf>) -> Step {
        tracing::error!(%version, %reason, "rolling back: stopping the new release, restoring the database");
        self.phase = Phase::RollingBack {
            reason,
            version,
            bundle,
            draining: true,
        };
        let previous = self.state.previous.unwrap_or(Release::Factory);
        let revision = self.next_revision;
        self.next_revision += 1;
        self.releases.insert(revision, previous);
        Step::Recreate(revision)
    }

    /// Every replica has stopped: restore the database (on a blocking task).
    pub fn drained(&mut self, done: impl FnOnce(OtaEvent) + Send + 'static) {
        let Phase::RollingBack { draining, .. } = &mut self.phase else {
            return;
        };
        if !*draining {
            return;
        }
        *draining = false;
        failpoint::hit("agent.drained");
        let previous = self.state.previous.unwrap_or(Release::Factory);
        let layout = self.layout.clone();
        let command = self.release_command.clone();
        let dir = release_dir(previous, &self.layout, &self.settings.factory_bin);
        tokio::task::spawn_blocking(move || {
            done(OtaEvent::Restored(restore_database(
                &layout, &command, &dir,
            )));
        });
    }

    /// Whether the agent waits for every replica to stop.
    pub fn draining(&self) -> bool {
        matches!(self.phase, Phase::RollingBack { draining: true, .. })
    }

    /// The database is restored (or could not be): record the rollback, start the previous
    /// release.
    pub fn restored(&mut self, result: Result<(), DatabaseError>) -> Step {
        let Some(Phase::RollingBack {
            reason,
            version,
            bundle,
            ..
        }) = self.take_phase("restored", |p| {
            matches!(
                p,
                Phase::RollingBack {
                    draining: false,
                    ..
                }
            )
        })
        else {
            return Step::None;
        };
        failpoint::hit("agent.restored");
        let reason = match result {
            Ok(()) => reason,
            Err(error) => {
                tracing::error!(%error, "the database could not be restored from the snapshot");
                format!("{reason}; the database could not be restored: {error}")
            }
        };
        let next = self.state.rollback(&reason);
        if let Err(error) = self.persist(next) {
            tracing::error!(%error, "cannot record the rollback");
        }
        self.write_receipt(bundle.as_deref(), "rolled_back", Some(&version), &reason);
        Step::Resume
    }

    /// Starts an inbox scan on a blocking task unless one runs or an update is in progress.
    pub fn scan(&mut self, keys_dir: &Path, done: impl FnOnce(OtaEvent) + Send + 'static) {
        if self.scanning || !self.is_idle() {
            return;
        }
        self.scanning = true;
        let dirs = expand_inboxes(&self.settings.inbox);
        let judged = self.judged.clone();
        let skip: Vec<String> = self
            .state
            .failed_bundles
            .iter()
            .cloned()
            // The running release is not offered again; a ready slot that was never switched
            // to (a power cut between install and switch) is, and is installed again.
            .chain(match self.state.active {
                Release::Slot(slot) => self.state.slot(slot).bundle_digest.clone(),
                Release::Factory => None,
            })
            .collect();
        let product = self.settings.product.clone();
        let floor = self.state.highest_security_version;
        let keys_dir = keys_dir.to_owned();
        let ota_dir = self.layout.dir.clone();
        tokio::task::spawn_blocking(move || {
            accept_keysets(&dirs, &keys_dir, &ota_dir, &product);
            done(OtaEvent::Found(scan_inboxes(
                &dirs, &judged, &skip, &product, floor,
            )));
        });
    }

    /// A scan finished.
    pub fn scanned(&mut self) {
        self.scanning = false;
    }

    /// A signed receipt in `<ota>/receipts/`, and in `receipts/` beside the bundle when that
    /// directory is writable or `remount_sticks` may make it so (a USB stick carries the
    /// fleet's audit trail back).
    fn write_receipt(
        &self,
        bundle: Option<&Path>,
        result: &str,
        version: Option<&str>,
        reason: &str,
    ) {
        let receipt = crate::receipt::Receipt {
            device: String::new(),
            from: self.version_of(self.state.previous.unwrap_or(self.state.active)),
            to: version.unwrap_or("").to_owned(),
            result: result.to_owned(),
            reason: reason.to_owned(),
            bundle: bundle
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned()),
            started_at: self.started_at,
            finished_at: unix_now(),
            resumed_bytes: self.resumed,
            unchanged_bytes: self.unchanged,
        };
        let mut dirs = vec![self.layout.dir.join("receipts")];
        if let Some(parent) = bundle
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
        {
            dirs.push(parent.join("receipts"));
        }
        if let Err(error) = crate::receipt::write(
            &self.layout.dir.join("device.key"),
            receipt,
            &dirs,
            if self.settings.remount_sticks {
                &self.settings.inbox
            } else {
                &[]
            },
        ) {
            tracing::warn!(%error, "cannot write the install receipt");
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent on an empty data directory (factory release, idle), put in `phase`.
    fn agent_in(dir: &Path, phase: Phase) -> Agent {
        let settings = crate::SettingsFile::default()
            .validate(dir, dir.to_owned())
            .unwrap();
        let command = ReleaseCommand::new(|_| std::process::Command::new("false"));
        let mut agent = Agent::open(Layout::new(dir), settings, command).unwrap();
        agent.phase = phase;
        agent
    }

    fn trial() -> Phase {
        Phase::Trial {
            revision: 1,
            version: "2.0.0".into(),
            issued_at: 0,
            bundle: None,
            deadline: Instant::now() + Duration::from_secs(60),
            healthy_since: None,
        }
    }

    /// An agent whose inactive slot holds release 2.0.0, switched to and on trial (revision
    /// 1), as `snapshotted` leaves it; `t0` is when the rollout started.
    fn on_trial(dir: &Path, t0: Instant) -> (Agent, SlotName) {
        let mut agent = agent_in(dir, Phase::Idle);
        let (state, slot) = agent.state.begin_install("d1", "2.0.0", 2).unwrap();
        let state = state.finish_install(slot).unwrap().switch(slot).unwrap();
        agent.state = agent.file.save(&mut RealFs, &state).unwrap();
        agent.releases.insert(1, Release::Slot(slot));
        agent.next_revision = 2;
        agent.phase = Phase::Trial {
            revision: 1,
            version: "2.0.0".into(),
            issued_at: 5,
            bundle: None,
            deadline: t0 + agent.settings.trial_deadline,
            healthy_since: None,
        };
        (agent, slot)
    }

    fn last_result(agent: &Agent) -> (UpdateOutcome, String) {
        let r = agent.status().last_result.expect("a result");
        (r.result, r.version)
    }

    /// Runs `drained` on a runtime and returns the event its blocking task reports.
    fn drain(agent: &mut Agent) -> OtaEvent {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.block_on(async {
            agent.drained(move |event| tx.send(event).unwrap());
            rx.recv_timeout(Duration::from_secs(30)).unwrap()
        })
    }

    #[test]
    fn a_trial_commits_after_every_replica_stayed_ready_for_the_trial_time() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, slot) = on_trial(dir.path(), t0);
        let trial = agent.settings.trial;
        let (ready, none) = (|_| true, |_| None);
        assert_eq!(agent.watch(ready, none, t0), (Step::None, false));
        assert_eq!(agent.status().state, UpdateState::Trial);
        assert_eq!(agent.next_deadline(), Some(t0 + trial));
        let almost = t0 + trial - Duration::from_millis(1);
        assert_eq!(agent.watch(ready, none, almost), (Step::None, false));
        assert_eq!(agent.watch(ready, none, t0 + trial), (Step::None, true));
        assert_eq!(agent.status().state, UpdateState::Checking);
        assert_eq!(agent.health_checked(Ok(())), Step::None);
        assert!(agent.is_idle());
        assert_eq!(agent.state.active, Release::Slot(slot));
        assert_eq!(
            last_result(&agent),
            (UpdateOutcome::Committed, "2.0.0".into())
        );
        assert_eq!(agent.status().security_version, 2);
        // Committed on disk too: a restart finds no trial to resume.
        let reopened = agent_in(dir.path(), Phase::Idle);
        assert_eq!(reopened.running_version(), "2.0.0");
        assert!(reopened.state.trial.is_none());
    }

    #[test]
    fn a_replica_leaving_readiness_restarts_the_trial_clock() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, _) = on_trial(dir.path(), t0);
        let trial = agent.settings.trial;
        let none = |_| None;
        agent.watch(|_| true, none, t0);
        let dip = t0 + trial / 2;
        assert_eq!(agent.watch(|_| false, none, dip), (Step::None, false));
        assert_eq!(agent.status().state, UpdateState::RollingOut);
        agent.watch(|_| true, none, dip);
        // The time counts again from the return to readiness, not from t0.
        assert_eq!(agent.watch(|_| true, none, t0 + trial), (Step::None, false));
        assert_eq!(agent.watch(|_| true, none, dip + trial), (Step::None, true));
    }

    #[test]
    fn a_failing_replica_rolls_back_and_the_previous_release_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, _) = on_trial(dir.path(), t0);
        let failed = |_| Some("replica-3 exited with code 3".to_owned());
        // A new model revision for the previous release: every replica is recreated.
        assert_eq!(
            agent.watch(|_| false, failed, t0),
            (Step::Recreate(2), false)
        );
        assert!(agent.draining());
        assert_eq!(agent.status().state, UpdateState::RollingBack);
        assert_eq!(agent.version_of_revision(2).as_deref(), Some("factory"));
        // No snapshot was taken in this test: the restore fails, and says so in the result.
        let OtaEvent::Restored(result) = drain(&mut agent) else {
            panic!("drained reports Restored")
        };
        assert!(
            matches!(result, Err(DatabaseError::NoSnapshot(_))),
            "{result:?}"
        );
        assert_eq!(agent.restored(result), Step::Resume);
        assert!(agent.is_idle());
        assert_eq!(agent.state.active, Release::Factory);
        let (outcome, version) = last_result(&agent);
        assert_eq!(
            (outcome, version.as_str()),
            (UpdateOutcome::RolledBack, "2.0.0")
        );
        let reason = agent.status().last_result.unwrap().reason.unwrap();
        assert!(reason.contains("replica-3 exited with code 3"), "{reason}");
        assert!(reason.contains("could not be restored"), "{reason}");
    }

    #[test]
    fn a_release_that_never_settles_is_rolled_back_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, _) = on_trial(dir.path(), t0);
        let deadline = t0 + agent.settings.trial_deadline;
        assert_eq!(agent.next_deadline(), Some(deadline));
        let before = deadline - Duration::from_millis(1);
        assert_eq!(
            agent.watch(|_| false, |_| None, before),
            (Step::None, false)
        );
        assert_eq!(
            agent.watch(|_| false, |_| None, deadline),
            (Step::Recreate(2), false)
        );
        assert_eq!(agent.status().state, UpdateState::RollingBack);
    }

    #[test]
    fn a_failed_health_command_rolls_back_instead_of_committing() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, slot) = on_trial(dir.path(), t0);
        let trial = agent.settings.trial;
        agent.watch(|_| true, |_| None, t0);
        assert_eq!(
            agent.watch(|_| true, |_| None, t0 + trial),
            (Step::None, true)
        );
        let failed = HealthError::Timeout {
            command: vec!["check".into()],
            after: Duration::from_secs(30),
        };
        assert_eq!(agent.health_checked(Err(failed)), Step::Recreate(2));
        assert_eq!(agent.status().state, UpdateState::RollingBack);
        // Not committed: the slot is still on trial until the rollback is recorded.
        assert_eq!(agent.state.trial.as_ref().map(|t| t.slot), Some(slot));
    }

    #[test]
    fn an_event_of_another_phase_never_erases_a_trial() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = agent_in(dir.path(), trial());
        assert_eq!(agent.snapshotted(Ok(()), Instant::now()), Step::None);
        assert_eq!(agent.health_checked(Ok(())), Step::None);
        assert_eq!(agent.restored(Ok(())), Step::None);
        assert_eq!(agent.status().state, UpdateState::RollingOut);
        assert!(matches!(agent.phase, Phase::Trial { revision: 1, .. }));
    }

    #[test]
    fn a_restore_result_before_the_replicas_drained_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let draining = Phase::RollingBack {
            reason: "test".into(),
            version: "2.0.0".into(),
            bundle: None,
            draining: true,
        };
        let mut agent = agent_in(dir.path(), draining);
        assert_eq!(agent.restored(Ok(())), Step::None);
        assert!(agent.draining(), "still waiting for the replicas to stop");
        assert_eq!(agent.status().state, UpdateState::RollingBack);
    }

    #[test]
    fn an_install_during_a_trial_is_refused_naming_the_phase() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = agent_in(dir.path(), trial());
        let refused = agent.start_install(dir.path().join("x.bundle"), dir.path().into(), |_| {});
        assert_eq!(
            refused,
            Err(NotIdle {
                phase: UpdateState::RollingOut
            })
        );
        assert!(matches!(agent.phase, Phase::Trial { .. }));
    }
}
