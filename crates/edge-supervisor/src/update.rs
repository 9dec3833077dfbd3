//! The OTA agent, in the supervisor: verify a bundle, install it in the inactive slot,
//! snapshot the database, switch, roll the replicas over one at a time, try the new release,
//! then commit, or roll back with the database restored and the trial's quotes exported.
//! (`update.md` has the diagram.)
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
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_proto::{Progress, UpdateResult, UpdateStatus};
use ota_bundle::{Bundle, Chunked, ChunksError, TrustedKeys};
use ota_slots::{
    Journal, Mark, Outcome, RealFs, Release, SlotName, SlotWriter, State, StateFile, failpoint,
};

use crate::config::{Ota, ServiceSpec};

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
    Snapshotted(Result<(), String>),
    HealthChecked(Result<(), String>),
    Restored(Result<(), String>),
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
    fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Installing { .. } => "installing",
            Phase::Snapshotting { .. } => "snapshotting",
            Phase::Trial {
                healthy_since: None,
                ..
            } => "rolling_out",
            Phase::Trial { .. } => "trial",
            Phase::Checking { .. } => "checking",
            Phase::RollingBack { .. } => "rolling_back",
        }
    }
}

/// The agent's state, owned by the dispatcher.
#[derive(Debug)]
pub struct Agent {
    pub layout: Layout,
    pub settings: Ota,
    pub state: State,
    pub phase: Phase,
    file: StateFile,
    progress: Arc<(AtomicU64, AtomicU64)>,
    /// Release of each model revision (revision 0 is what ran at start).
    pub releases: HashMap<u64, Release>,
    next_revision: u64,
    /// Bundles already taken (by path, size and mtime): an inbox scan does not offer an
    /// unchanged file again, so a refused bundle is not refused every scan.
    judged: HashMap<PathBuf, (u64, SystemTime)>,
    pub scanning: bool,
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
        settings: Ota,
        service: &ServiceSpec,
    ) -> Result<Agent, UpdateError> {
        let file = StateFile::new(&layout.dir);
        std::fs::create_dir_all(&layout.dir).map_err(|source| {
            UpdateError::State(ota_slots::StateError::Save {
                path: layout.dir.clone(),
                step: "create the OTA directory",
                source,
            })
        })?;
        let mut state = file.load()?;
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
                if let Err(error) =
                    restore_database(&layout, previous, service, &settings.factory_bin)
                {
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

    /// The version of a release, `factory` for the one shipped with the device.
    pub fn version_of(&self, release: Release) -> String {
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
            state: self.phase.name().to_owned(),
            target,
            progress,
            last_result: self.refusal.clone().or_else(|| {
                self.state.last_result.as_ref().map(|o| match o {
                    Outcome::Committed { version } => UpdateResult {
                        result: "committed".into(),
                        version: version.clone(),
                        reason: None,
                    },
                    Outcome::RolledBack { version, reason } => UpdateResult {
                        result: "rolled_back".into(),
                        version: version.clone(),
                        reason: Some(reason.clone()),
                    },
                    Outcome::InstallFailed { version, reason } => UpdateResult {
                        result: "install_failed".into(),
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
    ) -> Result<(), String> {
        if !self.is_idle() {
            return Err(format!(
                "an update is already in progress ({})",
                self.phase.name()
            ));
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

    /// The install finished: on success the snapshot comes next (the caller starts it).
    pub fn installed(
        &mut self,
        state: State,
        result: Result<Installed, UpdateError>,
    ) -> Option<Installed> {
        self.state = state;
        match result {
            Ok(installed) => {
                self.resumed = installed.resumed;
                self.unchanged = installed.unchanged;
                tracing::info!(version = %installed.version, slot = installed.slot.as_str(), bytes = installed.bytes, unchanged = installed.unchanged, resumed = installed.resumed, took_ms = installed.took.as_millis() as u64, "release installed; taking a database snapshot");
                self.phase = Phase::Snapshotting {
                    installed: installed.clone(),
                };
                Some(installed)
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
                            result: "refused".into(),
                            version: bundle.display().to_string(),
                            reason: Some(error.to_string()),
                        });
                    }
                }
                self.phase = Phase::Idle;
                None
            }
        }
    }

    /// The snapshot is taken (or failed): switch, and roll out the new release.
    pub fn snapshotted(&mut self, result: Result<(), String>, now: Instant) -> Step {
        let Phase::Snapshotting { installed } = std::mem::replace(&mut self.phase, Phase::Idle)
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
    pub fn health_checked(&mut self, result: Result<(), String>) -> Step {
        let Phase::Checking {
            version,
            issued_at,
            bundle,
        } = std::mem::replace(&mut self.phase, Phase::Idle)
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
    pub fn drained(&mut self, service: ServiceSpec, done: impl FnOnce(OtaEvent) + Send + 'static) {
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
        let factory_bin = self.settings.factory_bin.clone();
        tokio::task::spawn_blocking(move || {
            done(OtaEvent::Restored(restore_database(
                &layout,
                previous,
                &service,
                &factory_bin,
            )));
        });
    }

    /// Whether the agent waits for every replica to stop.
    pub fn draining(&self) -> bool {
        matches!(self.phase, Phase::RollingBack { draining: true, .. })
    }

    /// The database is restored (or could not be): record the rollback, start the previous
    /// release.
    pub fn restored(&mut self, result: Result<(), String>) -> Step {
        let Phase::RollingBack {
            reason,
            version,
            bundle,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Idle)
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One install, run on a blocking task. Owns a copy of the state while it runs.
struct Install {
    bundle: PathBuf,
    trusted_keys: PathBuf,
    product: String,
    layout: Layout,
    file: StateFile,
    state: State,
    progress: Arc<(AtomicU64, AtomicU64)>,
}

impl Install {
    fn run(self) -> (State, Result<Installed, UpdateError>) {
        let mut state = self.state.clone();
        let result = self.install(&mut state);
        (state, result)
    }

    fn install(&self, state: &mut State) -> Result<Installed, UpdateError> {
        let started = Instant::now();
        let (trusted, _) = load_trust(&self.trusted_keys, &self.layout.dir, &self.product)?;
        let file = std::fs::File::open(&self.bundle).map_err(|source| UpdateError::Open {
            path: self.bundle.clone(),
            source,
        })?;
        let bundle =
            Bundle::open(BufReader::with_capacity(1 << 20, file), &trusted).map_err(|source| {
                UpdateError::Bundle {
                    path: self.bundle.clone(),
                    source,
                }
            })?;
        let manifest = &bundle.manifest;
        let manifest_bytes = bundle.manifest_bytes.clone();
        let digest = ota_bundle::manifest_digest(&bundle.manifest_bytes);
        if manifest.product != self.product {
            return Err(UpdateError::Incompatible {
                found: manifest.product.clone(),
                expected: self.product.clone(),
            });
        }
        let below = manifest.security_version < state.highest_security_version;
        let older = manifest.security_version == state.highest_security_version
            && manifest.issued_at < state.highest_issued_at;
        if (below || older) && !self.permitted(&trusted, &digest) {
            if below {
                return Err(UpdateError::Downgrade {
                    found: manifest.security_version,
                    floor: state.highest_security_version,
                    device: crate::receipt::device_id(&self.layout.dir.join("device.key"))
                        .unwrap_or_else(|e| e.to_string()),
                });
            }
            return Err(UpdateError::Replay {
                found: manifest.issued_at,
                floor: state.highest_issued_at,
            });
        }
        if let Release::Slot(active) = state.active
            && state.slot(active).bundle_digest.as_deref() == Some(digest.as_str())
        {
            return Err(UpdateError::AlreadyRunning(manifest.version.clone()));
        }
        let copies = match &manifest.base {
            None => HashMap::new(),
            Some(base) => self.copy_index(state, base)?,
        };
        let needed: u64 = manifest.files.iter().map(|f| f.size).sum();
        let slots_dir = self.layout.dir.join("slots");
        std::fs::create_dir_all(&slots_dir).map_err(|e| UpdateError::Install {
            slot: "-",
            reason: format!("cannot create {}: {e}", slots_dir.display()),
        })?;
        let target = state.inactive();
        // The inactive slot's old content is freed before writing, so it counts as free.
        let reclaimable = dir_size(&self.layout.slot(target));
        let free = free_bytes(&slots_dir).saturating_add(reclaimable);
        // Headroom for directories, the state file and the file system's own blocks.
        let needed_with_margin = needed + needed / 32 + (1 << 20);
        if free < needed_with_margin {
            return Err(UpdateError::NoSpace {
                path: slots_dir,
                needed: needed_with_margin,
                free,
            });
        }
        self.progress.1.store(needed, Ordering::Relaxed);

        let mut journal = Journal::new(&self.layout.dir);
        let resume = journal
            .read()
            .filter(|m| {
                m.digest == digest
                    && m.slot == target
                    && state.slot(target).status == ota_slots::SlotStatus::Installing
                    && state.slot(target).bundle_digest.as_deref() == Some(digest.as_str())
            })
            .and_then(|mark| self.check_written(manifest, &mark).map(|kept| (mark, kept)));
        let slot = target;
        if resume.is_none() {
            let _ = journal.clear();
            let _ = std::fs::remove_file(self.layout.manifest(target));
            let (next, _) =
                state.begin_install(&digest, &manifest.version, manifest.security_version)?;
            *state = self.file.save(&mut RealFs, &next)?;
        }
        let version = manifest.version.clone();
        let issued_at = manifest.issued_at;
        let files: Vec<(String, u32, usize)> = manifest
            .files
            .iter()
            .map(|f| (f.path.clone(), f.mode, f.chunks.len()))
            .collect();
        let resumed = resume.as_ref().map_or(0, |(_, kept)| kept.total);
        self.progress.0.store(resumed, Ordering::Relaxed);
        // Err((blame, reason)): `blame` when the bundle itself is bad (remembered as failed);
        // a failed read of the bundle (the stick pulled out) only abandons the install.
        let written = (|| -> Result<(u64, u64), (bool, String)> {
            let local = |e: ota_slots::WriteError| (false, e.to_string());
            let slot_dir = self.layout.slot(slot);
            let (mut writer, from, prefix) = match resume {
                Some((mark, kept)) => {
                    let (path, mode, _) = &files[mark.file as usize];
                    let later: Vec<&str> = files[mark.file as usize + 1..]
                        .iter()
                        .map(|(p, _, _)| p.as_str())
                        .collect();
                    tracing::info!(path = %path, chunk = mark.chunk, resumed, "resuming an interrupted install");
                    let writer = SlotWriter::resume(
                        &slot_dir,
                        path,
                        *mode,
                        mark.chunk as usize,
                        kept.in_file,
                        &later,
                    )
                    .map_err(local)?;
                    let from = ota_bundle::Position {
                        file: mark.file as usize,
                        chunk: mark.chunk as usize,
                        offset: mark.offset,
                    };
                    // The chunk before the mark, as re-hashed by `check_written`: the next
                    // frame may be compressed with it (the reader checks it once more).
                    (writer, from, kept.last_chunk)
                }
                None => {
                    let paths: Vec<&str> = files.iter().map(|(p, _, _)| p.as_str()).collect();
                    (
                        SlotWriter::update(&slot_dir, &paths).map_err(local)?,
                        bundle.start(),
                        Vec::new(),
                    )
                }
            };
            let mut unsynced = 0u64;
            bundle
                .chunks_from(from, &prefix, |file, index, chunk, next| {
                    let copied;
                    let bytes = match chunk {
                        Chunked::Data(bytes) => bytes,
                        Chunked::Copy { hash } => {
                            copied = copy_chunk(&copies, hash)?;
                            &copied[..]
                        }
                    };
                    writer.chunk(&file.path, file.mode, index, bytes)?;
                    if index + 1 == file.chunks.len() {
                        // Length, mode and fsync now: a mark at the next file's start must
                        // cover a finished file, since a resume never comes back to it.
                        writer.finish_file()?;
                    }
                    self.progress
                        .0
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    unsynced += bytes.len() as u64;
                    // No mark after the last chunk: nothing would be left to resume.
                    let at_end = next.file + 1 == files.len() && next.chunk == files[next.file].2;
                    if unsynced >= JOURNAL_EVERY && !at_end {
                        writer.sync()?;
                        journal
                            .record(&Mark {
                                digest: digest.clone(),
                                slot,
                                file: next.file as u32,
                                chunk: next.chunk as u32,
                                offset: next.offset,
                            })
                            .map_err(|source| ota_slots::WriteError::Io {
                                path: self.layout.dir.join("install.journal"),
                                source,
                            })?;
                        unsynced = 0;
                    }
                    Ok(())
                })
                .map_err(|e: ChunksError<ota_slots::WriteError>| match e {
                    ChunksError::Bundle(ota_bundle::BundleError::Read { .. }) => {
                        (false, e.to_string())
                    }
                    ChunksError::Bundle(_) => (true, e.to_string()),
                    ChunksError::Sink(_) => (false, e.to_string()),
                })?;
            for (path, mode, chunks) in &files {
                if *chunks == 0 {
                    writer.empty_file(path, *mode).map_err(local)?;
                }
            }
            let unchanged = writer.unchanged();
            writer
                .finish()
                .map(|bytes| (bytes, unchanged))
                .map_err(local)
        })();
        let written = written.and_then(|written| {
            write_synced(&self.layout.manifest(slot), &manifest_bytes)
                .map(|()| written)
                .map_err(|e| (false, format!("cannot keep the manifest: {e}")))
        });
        match written {
            Ok((bytes, unchanged)) => {
                *state = self.file.save(&mut RealFs, &state.finish_install(slot)?)?;
                let _ = journal.clear();
                Ok(Installed {
                    slot,
                    resumed,
                    version,
                    issued_at,
                    bundle: self.bundle.clone(),
                    bytes,
                    unchanged,
                    took: started.elapsed(),
                })
            }
            Err((blame, reason)) => {
                let next = if blame {
                    state.fail_install(slot, &reason)?
                } else {
                    state.abandon_install(slot)?
                };
                *state = self.file.save(&mut RealFs, &next)?;
                let _ = journal.clear();
                let _ = std::fs::remove_dir_all(self.layout.slot(slot));
                Err(UpdateError::Install {
                    slot: slot.as_str(),
                    reason,
                })
            }
        }
    }

    /// A downgrade permit (`*.permit` beside the bundle) for this device and this bundle,
    /// signed by a threshold of the trusted keys.
    fn permitted(&self, trusted: &TrustedKeys, digest: &str) -> bool {
        let Ok(device) = crate::receipt::device_id(&self.layout.dir.join("device.key")) else {
            return false;
        };
        let dir = self.bundle.parent().unwrap_or(Path::new("."));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "permit") {
                continue;
            }
            let Some(doc) = read_doc(&path, "permit") else {
                continue;
            };
            match ota_bundle::Permit::verify(&doc, trusted, &self.product, &device, digest) {
                Ok(permit) => {
                    tracing::warn!(permit = %path.display(), version = %permit.version, "downgrade permitted");
                    return true;
                }
                Err(error) => {
                    tracing::info!(permit = %path.display(), %error, "permit not usable")
                }
            }
        }
        false
    }

    /// Where each chunk of the running release is, for a delta against `base`; refused unless
    /// the running release is exactly `base` (by its release digest).
    fn copy_index(
        &self,
        state: &State,
        base: &ota_bundle::Base,
    ) -> Result<HashMap<String, (PathBuf, u64, u64)>, UpdateError> {
        let refused = |running: String| UpdateError::Delta {
            base: base.version.clone(),
            running,
        };
        let Release::Slot(active) = state.active else {
            return Err(refused("the factory release".into()));
        };
        let running = state.slot(active).version.clone().unwrap_or_default();
        let bytes = std::fs::read(self.layout.manifest(active))
            .map_err(|_| refused(format!("{running} (whose manifest is not kept)")))?;
        let manifest = ota_bundle::Manifest::parse_canonical(&bytes)
            .map_err(|_| refused(format!("{running} (whose kept manifest is unreadable)")))?;
        if manifest.release_digest() != base.digest {
            return Err(refused(running));
        }
        let dir = self.layout.slot(active);
        let mut index = HashMap::new();
        for file in &manifest.files {
            for (i, chunk) in file.chunks.iter().enumerate() {
                index.entry(chunk.hash.clone()).or_insert((
                    dir.join(&file.path),
                    i as u64 * ota_bundle::CHUNK_SIZE,
                    chunk.size,
                ));
            }
        }
        Ok(index)
    }

    /// Re-hashes what an interrupted install wrote before `mark`: every file before it whole,
    /// and the chunks of its file before its chunk. What is kept, or None (start over).
    fn check_written(&self, manifest: &ota_bundle::Manifest, mark: &Mark) -> Option<Kept> {
        use std::io::Read;
        let dir = self.layout.slot(mark.slot);
        let mut kept = Kept::default();
        let mut buf = vec![0u8; ota_bundle::CHUNK_SIZE as usize];
        for (f, entry) in manifest
            .files
            .iter()
            .enumerate()
            .take(mark.file as usize + 1)
        {
            let chunks = if f == mark.file as usize {
                mark.chunk as usize
            } else {
                entry.chunks.len()
            };
            if chunks == 0 {
                continue;
            }
            let mut file = std::fs::File::open(dir.join(&entry.path)).ok()?;
            // A file before the mark's was finished (cut to length) before the mark was made.
            if f < mark.file as usize && file.metadata().ok()?.len() != entry.size {
                tracing::warn!(path = %entry.path, "the interrupted install left a file of the wrong length; starting over");
                return None;
            }
            for chunk in entry.chunks.iter().take(chunks) {
                let bytes = &mut buf[..chunk.size as usize];
                file.read_exact(bytes).ok()?;
                if ota_bundle::chunk_hash(bytes) != chunk.hash {
                    tracing::warn!(path = %entry.path, "the interrupted install's data does not match; starting over");
                    return None;
                }
                kept.total += chunk.size;
                if f == mark.file as usize {
                    kept.in_file += chunk.size;
                }
            }
            if f == mark.file as usize {
                kept.last_chunk = buf[..entry.chunks[chunks - 1].size as usize].to_vec();
            }
        }
        Some(kept)
    }
}

/// What an interrupted install left intact before its journal mark.
#[derive(Debug, Default)]
struct Kept {
    /// Bytes of the whole release.
    total: u64,
    /// Bytes of the file at the mark (the length it is cut back to).
    in_file: u64,
    /// The last chunk before the mark in that file (empty at its start): the prefix of the
    /// next frame in format 2.
    last_chunk: Vec<u8>,
}

/// A journal mark after about this much data (each mark costs an fsync of the slot).
const JOURNAL_EVERY: u64 = 4 << 20;

/// Reads a signed document of `kind`, bounded; None (logged) if unreadable or malformed.
fn read_doc(path: &Path, kind: &str) -> Option<ota_bundle::SignedDoc> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(ota_bundle::MAX_DOC_LEN + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    match ota_bundle::SignedDoc::parse(&bytes, kind) {
        Ok(doc) => Some(doc),
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "not a usable document");
            None
        }
    }
}

/// The keys trusted now: the factory set from `keys_dir` (on the device, the read-only root),
/// then every accepted key set `<ota>/keysets/<N>.keyset` in order, each re-verified against
/// the set before it. Returns the keys and the serial of the newest set (0: the factory's).
pub fn load_trust(
    keys_dir: &Path,
    ota_dir: &Path,
    product: &str,
) -> Result<(TrustedKeys, u64), UpdateError> {
    let mut trusted = TrustedKeys::load_dir(keys_dir).map_err(UpdateError::Keys)?;
    let mut serial = 0;
    loop {
        let path = ota_dir
            .join("keysets")
            .join(format!("{}.keyset", serial + 1));
        if !path.exists() {
            return Ok((trusted, serial));
        }
        let doc = read_doc(&path, "keyset").ok_or_else(|| {
            UpdateError::Keys(ota_bundle::BundleError::Manifest(format!(
                "the accepted key set {} is unreadable",
                path.display()
            )))
        })?;
        let (_, next) = ota_bundle::KeySet::verify_next(&doc, &trusted, serial, product)
            .map_err(UpdateError::Keys)?;
        trusted = next;
        serial += 1;
    }
}

/// Accepts key sets found in the inboxes, in serial order: each must be signed by a threshold
/// of the keys trusted before it. Returns the serials accepted.
fn accept_keysets(dirs: &[PathBuf], keys_dir: &Path, ota_dir: &Path, product: &str) -> Vec<u64> {
    let mut found: Vec<ota_bundle::SignedDoc> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "keyset"))
        .filter_map(|p| read_doc(&p, "keyset"))
        .collect();
    let mut accepted = Vec::new();
    while !found.is_empty() {
        let Ok((trusted, serial)) = load_trust(keys_dir, ota_dir, product) else {
            return accepted;
        };
        let next = found.iter().position(|doc| {
            ota_bundle::KeySet::verify_next(doc, &trusted, serial, product).is_ok()
        });
        let Some(i) = next else { break };
        let doc = found.remove(i);
        let dir = ota_dir.join("keysets");
        let path = dir.join(format!("{}.keyset", serial + 1));
        match std::fs::create_dir_all(&dir)
            .and_then(|()| write_synced(&path, doc.to_text().as_bytes()))
        {
            Ok(()) => {
                tracing::warn!(
                    serial = serial + 1,
                    "key set accepted: trusted keys rotated"
                );
                accepted.push(serial + 1);
            }
            Err(error) => {
                tracing::error!(%error, "cannot keep the key set");
                break;
            }
        }
    }
    accepted
}

/// Reads a chunk of the running release for a delta, and checks it against the signed hash
/// (a damaged running release must not leak into the new one).
fn copy_chunk(
    copies: &HashMap<String, (PathBuf, u64, u64)>,
    hash: &str,
) -> Result<Vec<u8>, ota_slots::WriteError> {
    use std::io::{Read, Seek};
    let missing = |path: PathBuf, why: String| ota_slots::WriteError::Io {
        path,
        source: std::io::Error::other(why),
    };
    let (path, offset, size) = copies.get(hash).ok_or_else(|| {
        missing(
            PathBuf::from("(running release)"),
            format!("chunk {hash} is not in the running release"),
        )
    })?;
    let mut bytes = vec![0u8; *size as usize];
    let mut file = std::fs::File::open(path).map_err(|e| missing(path.clone(), e.to_string()))?;
    file.seek(std::io::SeekFrom::Start(*offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| missing(path.clone(), e.to_string()))?;
    if ota_bundle::chunk_hash(&bytes) != hash {
        return Err(missing(
            path.clone(),
            "the running release's chunk does not match its hash".into(),
        ));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir).map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The inbox directories and their immediate subdirectories (where USB sticks get mounted,
/// one directory per stick), except the receipts written there.
fn expand_inboxes(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for dir in dirs {
        all.push(dir.clone());
        if let Ok(entries) = std::fs::read_dir(dir) {
            all.extend(
                entries
                    .flatten()
                    .filter(|e| {
                        e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "receipts"
                    })
                    .map(|e| e.path()),
            );
        }
    }
    all
}

/// Bundles in the inboxes that could be installed: readable manifest, this product, not
/// failed or already in a slot, not below the anti-rollback floor. Best (highest security
/// version, then newest) first. Signatures are checked by the install, not here.
fn scan_inboxes(
    dirs: &[PathBuf],
    judged: &HashMap<PathBuf, (u64, SystemTime)>,
    skip: &[String],
    product: &str,
    floor: u64,
) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "bundle") {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let key = (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
            if judged.get(&path) == Some(&key) {
                continue;
            }
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            match ota_bundle::read_manifest_and_digest_unverified(BufReader::new(file)) {
                Ok((manifest, _, digest)) => {
                    let permit_beside = manifest.security_version < floor
                        && std::fs::read_dir(dir).is_ok_and(|mut e| {
                            e.any(|e| {
                                e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "permit"))
                            })
                        });
                    if manifest.product != product
                        || (manifest.security_version < floor && !permit_beside)
                        || skip.contains(&digest)
                    {
                        tracing::debug!(bundle = %path.display(), "inbox: not offered");
                        continue;
                    }
                    found.push(((manifest.security_version, manifest.issued_at), path));
                }
                Err(error) => {
                    tracing::warn!(bundle = %path.display(), %error, "inbox: not a usable bundle");
                }
            }
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Runs the release's own database command (`quote-service snapshot|restore`), with the
/// replica environment (so it finds the same database).
fn database_command(
    release: Release,
    layout: &Layout,
    service: &ServiceSpec,
    factory_bin: &Path,
    args: &[&str],
) -> Result<(), String> {
    let data_dir = layout.dir.parent().unwrap_or(Path::new("."));
    let release = release_dir(release, layout, factory_bin);
    let values = crate::process::Placeholders::new(data_dir, 0, 0, &release);
    let launch = crate::process::launch(service, &values);
    let program = launch.program;
    let output = std::process::Command::new(&program)
        .args(&launch.args)
        .args(args)
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "PATH"))
        .envs(&launch.env)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        Err(format!(
            "{} {} failed ({}): {last}",
            program.display(),
            args.join(" "),
            output.status
        ))
    }
}

/// Snapshot of the live database, by the running release.
pub fn snapshot_database(
    layout: &Layout,
    release: Release,
    service: &ServiceSpec,
    factory_bin: &Path,
) -> Result<(), String> {
    let to = layout.snapshot();
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    database_command(
        release,
        layout,
        service,
        factory_bin,
        &["snapshot", "--to", &to.to_string_lossy()],
    )
}

/// Puts the snapshot back with `release`'s binary, exporting the trial's quotes to
/// `<ota>/rollback/<unix time>-trial-quotes.jsonl`.
pub fn restore_database(
    layout: &Layout,
    release: Release,
    service: &ServiceSpec,
    factory_bin: &Path,
) -> Result<(), String> {
    let snapshot = layout.snapshot();
    if !snapshot.exists() {
        return Err(format!("there is no snapshot at {}", snapshot.display()));
    }
    let dir = layout.dir.join("rollback");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let export = dir.join(format!("{}-trial-quotes.jsonl", unix_now()));
    database_command(
        release,
        layout,
        service,
        factory_bin,
        &[
            "restore",
            "--from",
            &snapshot.to_string_lossy(),
            "--export",
            &export.to_string_lossy(),
        ],
    )
}

/// Runs the health commands in order; the first failure (exit, or 30 s without an exit) ends.
pub async fn health_commands(commands: Vec<Vec<String>>) -> Result<(), String> {
    for command in commands {
        let run = tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(30), run).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => {
                return Err(format!("{:?} exited with {}", command, out.status));
            }
            Ok(Err(e)) => return Err(format!("cannot run {command:?}: {e}")),
            Err(_) => return Err(format!("{command:?} did not finish within 30s")),
        }
    }
    Ok(())
}
