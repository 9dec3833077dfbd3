//! The OTA agent, linked into the supervisor: verify a bundle, install it in the inactive slot,
//! snapshot the database, switch, roll the replicas over one at a time, try the new release,
//! then commit, or roll back with the database restored and the trial's quotes exported.
//!
//! [`Agent`] is the I/O driver around the pure [`Machine`] (`machine.rs`, diagram in
//! `agent.md`): it owns the slot state (`ota-slots`), carries out the machine's actions, and
//! runs the slow ones (verifying and writing a bundle, the database snapshot and restore,
//! health commands, inbox scans) on tasks that report back as [`OtaEvent`]s through the
//! dispatcher. The slot state is saved before each step that depends on it, so that after a
//! power cut at any instant the agent starts from a consistent slot: an interrupted install
//! resumes or is abandoned (the bundle is offered again), an interrupted trial is tried again,
//! up to `max_trial_boots`, then rolled back.
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
use ota_slots::{Journal, Outcome, RealFs, Release, SlotName, State, StateFile};

use crate::receipt::Due;

use crate::database::{
    DatabaseError, HealthError, ReleaseCommand, health_commands, restore_database,
    snapshot_database,
};
use crate::depot::DepotSource;
use crate::install::Install;
use crate::machine::{
    Action, Event, Machine, OutOfPhase, Phase, Refusal, Restart, Target, Timings, after_restart,
};
use crate::settings::Settings;
use crate::source::{DepotOffer, Inbox, Offer, Source, Wanted};

/// The agent's files under the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `<data_dir>/ota`: `state.json`, `slots/{a,b}/`, `snapshot/quotes.db`, `rollback/`,
    /// `receipts/`, `inbox/`, `device.key`.
    pub dir: PathBuf,
    /// The update's snapshot of the database, written by the release's database tool.
    snapshot: PathBuf,
    /// Where a rollback's exports of the trial's quotes go, also written by that tool.
    rollback: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Layout {
        let dir = data_dir.join("ota");
        Layout {
            snapshot: dir.join("snapshot").join("quotes.db"),
            rollback: dir.join("rollback"),
            dir,
        }
    }

    /// The same layout with the database tool's files directly in `dir` (`ota.database_dir`,
    /// the replicas' directory when they run as their own user): `dir/snapshot.db` and the
    /// exports beside it. Flat, so that the directory alone must exist: systemd-tmpfiles
    /// refuses to make directories inside another user's (an unsafe path transition).
    pub fn with_database_dir(self, dir: &Path) -> Layout {
        Layout {
            snapshot: dir.join("snapshot.db"),
            rollback: dir.to_owned(),
            ..self
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
    /// The signed head of the bundle the release in `slot` came from (header, manifest,
    /// signatures): what the slot is checked against before it runs.
    pub fn head(&self, slot: SlotName) -> PathBuf {
        self.dir
            .join("slots")
            .join(format!("{}.head", slot.as_str()))
    }
    pub fn snapshot(&self) -> PathBuf {
        self.snapshot.clone()
    }
    /// Where a rollback's exports of the trial's quotes go.
    pub fn rollback(&self) -> PathBuf {
        self.rollback.clone()
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
         installing it needs a downgrade permit for device {device} next to the bundle (a permit is used once)"
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
    #[error(
        "security version jump refused: the bundle has security version {found}, the device has \
         committed {floor}, and one update may raise it by at most {max} (ota.max_security_step); \
         install the releases in between first"
    )]
    SecurityJump { found: u64, floor: u64, max: u64 },
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
    #[error(
        "this copy of the bundle is damaged ({reason}): slot {slot} was emptied; the release is \
         not held against, another copy of it may be installed"
    )]
    DamagedCopy { slot: &'static str, reason: String },
    #[error(
        "the bundle {path} is {len} bytes, its signed manifest describes {expected}: a damaged or \
         incomplete copy (nothing was written; try another copy)"
    )]
    Incomplete {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error(transparent)]
    Tampered(#[from] crate::release_check::Tampered),
    #[error("cannot tell the free space in {path}: {source}; nothing was written")]
    FreeSpace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the trusted keys in {dir} include the repository's test key {key}, whose secret is public: \
         anyone could sign updates for this device. Trust your release keys instead; for \
         development only, set `allow_test_key = true` in [ota]"
    )]
    TestKeyTrusted { dir: PathBuf, key: &'static str },
    #[error("cannot make {path} searchable for the replicas (mode 0711): {source}")]
    Searchable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The replicas run the release from `<ota>/slots/<slot>/bin`, possibly as a user of their own
/// that must not read the OTA state: `<ota>` and `<ota>/slots` are searchable by everyone but
/// listable only by the supervisor (0711), and every file in them but a slot's programs stays
/// private to the supervisor (its umask; the unit's is 0077).
fn searchable(layout: &Layout) -> Result<(), UpdateError> {
    use std::os::unix::fs::PermissionsExt;
    let slots = layout.dir.join("slots");
    for dir in [&layout.dir, &slots] {
        durable::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)))
            .map_err(|source| UpdateError::Searchable {
                path: dir.clone(),
                source,
            })?;
    }
    Ok(())
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
    pub bundle: Offer,
    pub bytes: u64,
    /// Bytes the slot already held (its older release): compared, not written again.
    pub unchanged: u64,
    /// From opening the bundle to the slot marked ready (verify, write, fsync).
    pub took: Duration,
}

/// Results of the agent's blocking tasks, delivered to the dispatcher, which hands them back
/// with [`Agent::on_event`] (all but `Found`, which it acts on itself).
#[derive(Debug)]
pub enum OtaEvent {
    /// An inbox scan found bundles worth offering, best first.
    Found(Vec<Offer>),
    Installed(Box<(State, Result<Installed, UpdateError>)>),
    Snapshotted(Result<(), DatabaseError>),
    HealthChecked(Result<(), HealthError>),
    Restored(Result<(), DatabaseError>),
    /// The receipt of an outcome is written (or could not be: logged). `due_written`: it
    /// was the receipt the state holds as due, and it is on the device now.
    Recorded {
        due_written: bool,
    },
}

/// Where the agent's tasks report their [`OtaEvent`]s (the dispatcher's queue); always called
/// from a blocking thread, so it may block.
pub type Notify = Arc<dyn Fn(OtaEvent) + Send + Sync>;

/// The agent: the I/O driver around the pure [`Machine`]. It owns the slot state, runs what the
/// machine's actions name (blocking work on tasks that report through [`Notify`]) and turns
/// the results into the machine's events. Owned by the dispatcher.
pub struct Agent {
    layout: Layout,
    settings: Settings,
    /// The directory of the factory's trusted keys (`--trusted-keys`).
    trusted_keys: PathBuf,
    state: State,
    machine: Machine,
    /// Runs a release's database tool the way the supervisor runs the release.
    release_command: ReleaseCommand,
    notify: Notify,
    /// Where bundles are offered from: the inboxes, then any source added.
    sources: Vec<Arc<dyn Source>>,
    file: StateFile,
    progress: Arc<(AtomicU64, AtomicU64)>,
    /// Release of each model revision (revision 0 is what ran at start).
    releases: HashMap<u64, Release>,
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
    /// The version running when the current update started (a receipt's `from`).
    from: String,
    /// Slots checked against their signed manifest, and their files as they were then.
    verified: HashMap<SlotName, crate::release_check::Verified>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("dir", &self.layout.dir)
            .field("phase", self.machine.phase())
            .field("active", &self.state.active)
            .finish_non_exhaustive()
    }
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
    /// abandoned unless its journal lets it resume; a trial is counted, and rolled back when it
    /// has taken too many starts (the database is restored before the previous release runs
    /// again).
    pub fn open(
        layout: Layout,
        settings: Settings,
        trusted_keys: PathBuf,
        release_command: ReleaseCommand,
        notify: Notify,
    ) -> Result<Agent, UpdateError> {
        if crate::trust::trusts_test_key(&trusted_keys, &layout.dir, &settings.product) {
            if !settings.allow_test_key {
                return Err(UpdateError::TestKeyTrusted {
                    dir: trusted_keys,
                    key: crate::trust::REPOSITORY_TEST_KEY,
                });
            }
            tracing::warn!(keys = %trusted_keys.display(), "DEVELOPMENT ONLY: the repository's test key is trusted (allow_test_key); anyone can sign updates for this device");
        }
        let layout = match &settings.database_dir {
            Some(dir) => layout.with_database_dir(dir),
            None => layout,
        };
        let (file, state) = layout.open_state()?;
        searchable(&layout)?;
        let state = settle_installs(&layout, &file, state)?;
        let timings = Timings {
            trial: settings.trial,
            trial_deadline: settings.trial_deadline,
        };
        let (state, machine) =
            settle_trial(&layout, &settings, &release_command, &file, state, timings)?;
        let state = write_receipt_due(&layout, &file, state);
        // A trial resumed at start reports what its install did before the restart.
        let (started_at, resumed, unchanged) =
            state.trial.as_ref().map_or((unix_now(), 0, 0), |t| {
                (t.started_at, t.resumed_bytes, t.unchanged_bytes)
            });
        let releases = HashMap::from([(0, state.active)]);
        // During a trial resumed at start, the release updated from is the previous one.
        let from = version_of(&state, state.previous.unwrap_or(state.active));
        let inbox = Inbox {
            dirs: settings.inbox.clone(),
            keys_dir: trusted_keys.clone(),
            ota_dir: layout.dir.clone(),
        };
        let mut sources: Vec<Arc<dyn Source>> = vec![Arc::new(inbox)];
        if let Some(depot) = &settings.depot {
            sources.push(Arc::new(DepotSource::new(
                depot,
                settings.poll_interval,
                &trusted_keys,
                &layout.dir,
            )));
        }
        Ok(Agent {
            sources,
            layout,
            settings,
            trusted_keys,
            state,
            machine,
            release_command,
            notify,
            file,
            progress: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
            releases,
            judged: HashMap::new(),
            scanning: false,
            started_at,
            refusal: None,
            resumed,
            unchanged,
            verified: HashMap::new(),
            from,
        })
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.machine.phase(), Phase::Idle)
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

    /// Checks that model `revision` may run: a slot's files must match the manifest its bundle
    /// signed (kept beside it, verified against the keys trusted now). A full check hashes the
    /// slot; after that, a `stat` per file until one changes. The factory release lives on the
    /// read-only root and is not checked here.
    pub fn check_release(&mut self, revision: u64) -> Result<(), UpdateError> {
        let release = self
            .releases
            .get(&revision)
            .copied()
            .unwrap_or(self.state.active);
        let Release::Slot(slot) = release else {
            return Ok(());
        };
        if self.verified.get(&slot).is_some_and(|v| v.unchanged()) {
            return Ok(());
        }
        self.verified.remove(&slot);
        let (trusted, _) =
            crate::trust::load_trust(&self.trusted_keys, &self.layout.dir, &self.settings.product)?;
        let verified = crate::release_check::verify_slot(&self.layout, slot, &trusted)?;
        self.verified.insert(slot, verified);
        Ok(())
    }

    /// The version of a release, `factory` for the one shipped with the device.
    fn version_of(&self, release: Release) -> String {
        version_of(&self.state, release)
    }

    /// `status --json`'s `update`.
    pub fn status(&self) -> UpdateStatus {
        let phase = self.machine.phase();
        let target = match phase {
            Phase::Idle => None,
            Phase::Installing { bundle } => Some(bundle.to_string()),
            Phase::Snapshotting { target }
            | Phase::Switching { target }
            | Phase::Trial { target, .. }
            | Phase::Checking { target }
            | Phase::RollingBack { target, .. } => Some(target.version.clone()),
            Phase::Recording { about } => Some(about.clone()),
        };
        let progress = matches!(phase, Phase::Installing { .. }).then(|| Progress {
            done: self.progress.0.load(Ordering::Relaxed),
            total: self.progress.1.load(Ordering::Relaxed),
        });
        UpdateStatus {
            version: self.version_of(self.state.active),
            slot: match self.state.active {
                Release::Factory => None,
                Release::Slot(slot) => Some(slot.as_str().to_owned()),
            },
            state: phase.state(),
            target,
            progress,
            last_result: self
                .refusal
                .clone()
                .or_else(|| self.state.last_result.as_ref().map(update_result)),
            security_version: self.state.highest_security_version,
        }
    }

    /// Starts installing `bundle` on a blocking task; refused unless idle.
    pub fn start_install(&mut self, bundle: Offer) -> Result<(), NotIdle> {
        self.drive(Event::Install { bundle }, Instant::now())
            .map(|_| ())
            .map_err(|refused| NotIdle {
                phase: refused.phase,
            })
    }

    /// Takes a blocking task's result (not `Found`, which the dispatcher acts on).
    pub fn on_event(&mut self, event: OtaEvent, now: Instant) -> Step {
        let event = match event {
            OtaEvent::Found(_) => {
                tracing::warn!("an inbox scan's result was handed to the agent: ignored");
                return Step::None;
            }
            OtaEvent::Installed(done) => self.installed(*done),
            OtaEvent::Snapshotted(result) => Event::Snapshotted(result.map_err(|error| {
                tracing::error!(%error, "no database snapshot, so no update: the slot stays installed but unused");
                error.to_string()
            })),
            OtaEvent::HealthChecked(result) => Event::HealthChecked(result.map_err(|e| e.to_string())),
            OtaEvent::Recorded { due_written } => {
                // Only the due receipt's own successful write clears it: one not written stays
                // due, for the next start (a refusal's receipt never touches it).
                if due_written
                    && self.state.receipt_due.is_some()
                    && let Err(error) = self.persist(Ok(self.state.receipt_written()))
                {
                    tracing::warn!(%error, "cannot mark the receipt written; it is written again (once) at the next start");
                }
                Event::Recorded
            }
            OtaEvent::Restored(result) => Event::Restored(result.map_err(|error| {
                tracing::error!(%error, "the database could not be restored from the snapshot");
                error.to_string()
            })),
        };
        self.drive(event, now).unwrap_or(Step::None)
    }

    /// The install finished: adopts the state it saved and reports it to the machine.
    fn installed(&mut self, (state, result): (State, Result<Installed, UpdateError>)) -> Event {
        self.state = state;
        Event::Installed(match result {
            Ok(installed) => {
                self.resumed = installed.resumed;
                self.unchanged = installed.unchanged;
                tracing::info!(version = %installed.version, slot = installed.slot.as_str(), bytes = installed.bytes, unchanged = installed.unchanged, resumed = installed.resumed, took_ms = installed.took.as_millis() as u64, "release installed; taking a database snapshot");
                Ok(Target {
                    slot: installed.slot,
                    version: installed.version,
                    issued_at: installed.issued_at,
                    bundle: Some(installed.bundle),
                })
            }
            Err(error) => {
                tracing::error!(%error, "update refused");
                Err(Refusal {
                    reason: error.to_string(),
                    slot_touched: matches!(
                        error,
                        UpdateError::Install { .. } | UpdateError::DamagedCopy { .. }
                    ),
                    // Stopped by something other than the file (the stick pulled out, a write
                    // error): the same file is offered again.
                    offer_again: matches!(error, UpdateError::Install { .. }),
                })
            }
        })
    }

    /// Judges the trial from the model's view: `settled` (every replica of the revision on
    /// trial ready), and that revision's failures.
    pub fn watch(
        &mut self,
        settled: impl Fn(u64) -> bool,
        failures: impl Fn(u64) -> Option<String>,
        now: Instant,
    ) -> Step {
        let Some(revision) = self.machine.trial_revision() else {
            return Step::None;
        };
        let event = Event::Watched {
            settled: settled(revision),
            failure: failures(revision),
        };
        self.drive(event, now).unwrap_or(Step::None)
    }

    /// When [`Agent::watch`] needs to look again (the trial time running out, the deadline).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.machine.next_deadline()
    }

    /// Whether the agent waits for every replica to stop.
    pub fn draining(&self) -> bool {
        matches!(
            self.machine.phase(),
            Phase::RollingBack { draining: true, .. }
        )
    }

    /// Every replica has stopped: the database is restored next (on a blocking task).
    pub fn drained(&mut self, now: Instant) -> Step {
        self.drive(Event::Drained, now).unwrap_or(Step::None)
    }

    /// Hands `event` to the machine and carries out its actions, feeding back the events of
    /// the actions done on the spot (the switch). An event out of phase is reported and changes
    /// nothing.
    fn drive(&mut self, event: Event, now: Instant) -> Result<Step, OutOfPhase> {
        let mut step = Step::None;
        let mut next = Some(event);
        let mut first = true;
        while let Some(event) = next.take() {
            let before = self.machine.phase().state();
            let actions = match self.machine.handle(event, now) {
                Ok(actions) => actions,
                Err(refused) if first => {
                    tracing::warn!(%refused, "ignored");
                    return Err(refused);
                }
                Err(refused) => {
                    tracing::error!(%refused, "the agent fed itself an event out of phase");
                    break;
                }
            };
            first = false;
            if before == UpdateState::RollingOut
                && self.machine.phase().state() == UpdateState::Trial
            {
                failpoint::hit("agent.rolled_out");
            }
            for action in actions {
                if let Some(event) = self.act(action, &mut step) {
                    next = Some(event);
                }
            }
        }
        Ok(step)
    }

    /// Carries out one action; returns the event it produced on the spot, if any.
    fn act(&mut self, action: Action, step: &mut Step) -> Option<Event> {
        match action {
            Action::Install { bundle } => self.spawn_install(bundle),
            Action::Refused { bundle, refusal } => self.record_refusal(&bundle, refusal),
            Action::Snapshot => {
                let dir = release_dir(self.state.active, &self.layout, &self.settings.factory_bin);
                let (layout, command) = (self.layout.clone(), self.release_command.clone());
                let notify = Arc::clone(&self.notify);
                tokio::task::spawn_blocking(move || {
                    notify(OtaEvent::Snapshotted(snapshot_database(
                        &layout, &command, &dir,
                    )));
                });
            }
            Action::Switch { slot } => {
                failpoint::hit("agent.snapshotted");
                let (started, resumed, unchanged) = (self.started_at, self.resumed, self.unchanged);
                let next = self
                    .state
                    .switch(slot)
                    .map(|s| s.with_trial_report(started, resumed, unchanged));
                let switched = self.persist(next).map_err(|error| {
                    tracing::error!(%error, "cannot record the switch; the update is not started");
                    error.to_string()
                });
                return Some(Event::Switched(switched));
            }
            Action::RollOut { revision, slot } => {
                self.releases.insert(revision, Release::Slot(slot));
                tracing::info!(
                    slot = slot.as_str(),
                    "switched; replacing the replicas one at a time"
                );
                *step = Step::RollOut(revision);
            }
            Action::CheckHealth => {
                let commands = self.settings.health_commands.clone();
                let notify = Arc::clone(&self.notify);
                // On a blocking thread like every other task, so that `notify` may block.
                tokio::task::spawn_blocking(move || {
                    let runtime = tokio::runtime::Handle::current();
                    let result = runtime.block_on(health_commands(commands));
                    notify(OtaEvent::HealthChecked(result));
                });
            }
            Action::Commit { target } => return self.commit(target),
            Action::Recreate { revision } => {
                let previous = self.state.previous.unwrap_or(Release::Factory);
                self.releases.insert(revision, previous);
                if let Phase::RollingBack { target, reason, .. } = self.machine.phase() {
                    tracing::error!(version = %target.version, %reason, "rolling back: stopping the new release, restoring the database");
                }
                *step = Step::Recreate(revision);
            }
            Action::Restore => {
                failpoint::hit("agent.drained");
                let previous = self.state.previous.unwrap_or(Release::Factory);
                let dir = release_dir(previous, &self.layout, &self.settings.factory_bin);
                let (layout, command) = (self.layout.clone(), self.release_command.clone());
                let notify = Arc::clone(&self.notify);
                tokio::task::spawn_blocking(move || {
                    notify(OtaEvent::Restored(restore_database(
                        &layout, &command, &dir,
                    )));
                });
            }
            Action::RecordRollback { target, reason } => {
                failpoint::hit("agent.restored");
                let due = self.target_receipt(&target, "rolled_back", &reason);
                return self.record_outcome(self.state.rollback(&reason), due, "rollback");
            }
            Action::Resume => *step = Step::Resume,
        }
        None
    }

    /// Runs the install on a blocking task; it reports [`OtaEvent::Installed`].
    fn spawn_install(&mut self, bundle: Offer) {
        // Only the bundle taken is judged: the other candidates of the same scan stay on offer.
        if let Some(path) = bundle.path()
            && let Ok(meta) = std::fs::metadata(path)
        {
            self.judged.insert(
                path.to_owned(),
                (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH)),
            );
        }
        self.refusal = None;
        self.resumed = 0;
        self.unchanged = 0;
        self.from = self.running_version();
        self.started_at = unix_now();
        self.progress.0.store(0, Ordering::Relaxed);
        self.progress.1.store(0, Ordering::Relaxed);
        let job = Install {
            bundle,
            trusted_keys: self.trusted_keys.clone(),
            product: self.settings.product.clone(),
            max_security_step: self.settings.max_security_step,
            layout: self.layout.clone(),
            file: self.file.clone(),
            state: self.state.clone(),
            progress: Arc::clone(&self.progress),
            downloads: Arc::default(),
        };
        let notify = Arc::clone(&self.notify);
        tokio::task::spawn_blocking(move || {
            let (state, result) = job.run();
            notify(OtaEvent::Installed(Box::new((state, result))));
        });
    }

    fn record_refusal(&mut self, bundle: &Offer, refusal: Refusal) {
        if refusal.offer_again
            && let Some(path) = bundle.path()
        {
            self.judged.remove(path);
        }
        // A depot counts a refusal only with the bundle it refused named by its digest.
        let digest = match bundle {
            Offer::Depot(offer) => Some(offer.digest.clone()),
            Offer::File(_) => None,
        };
        let mut due = self.receipt(Some(bundle), digest, "", "refused", &refusal.reason);
        due.report = refusal_report(bundle, &refusal);
        self.write_due(due, false);
        if !refusal.slot_touched {
            self.refusal = Some(UpdateResult {
                result: UpdateOutcome::Refused,
                version: bundle.to_string(),
                reason: Some(refusal.reason),
            });
        }
    }

    /// The health commands passed: save the commit (the new anti-rollback floor).
    /// Returns [`Event::Recorded`] at once when there is no receipt to write.
    fn commit(&mut self, target: Target) -> Option<Event> {
        failpoint::hit("agent.checked");
        let issued_at = if target.issued_at == 0 {
            // After a restart the trial's issue time is not in memory; it is not needed for
            // the floor unless it equals the committed security version, and then the
            // committed issue time keeps the floor.
            self.state.highest_issued_at
        } else {
            target.issued_at
        };
        let due = self.target_receipt(&target, "committed", "");
        let recorded = self.record_outcome(self.state.commit(issued_at), due, "commit");
        if recorded.is_none() {
            tracing::info!(version = %target.version, "update committed");
        }
        // Not committed: the next start retries the trial, as after a power cut.
        recorded
    }

    /// Saves the state a verb produced (temporary file, fsync, rename) and adopts it.
    fn persist(&mut self, next: Result<State, ota_slots::Refused>) -> Result<(), UpdateError> {
        self.state = self.file.save(&mut RealFs, &next?)?;
        Ok(())
    }

    /// Offers from `source` too, after those of the sources before it.
    pub fn add_source(&mut self, source: Arc<dyn Source>) {
        self.sources.push(source);
    }

    /// Asks every source for offers on a blocking task (reported as [`OtaEvent::Found`])
    /// unless a scan runs or an update is in progress.
    pub fn scan(&mut self) {
        if self.scanning || !self.is_idle() {
            return;
        }
        self.scanning = true;
        let wanted = Wanted {
            product: self.settings.product.clone(),
            floor: self.state.highest_security_version,
            skip: self
                .state
                .failed_bundles
                .iter()
                .cloned()
                // The running release is not offered again; a ready slot that was never
                // switched to (a power cut between install and switch) is, and is installed
                // again.
                .chain(match self.state.active {
                    Release::Slot(slot) => self.state.slot(slot).bundle_digest.clone(),
                    Release::Factory => None,
                })
                .collect(),
            judged: self.judged.clone(),
            running: self.running_version(),
        };
        let sources = self.sources.clone();
        let notify = Arc::clone(&self.notify);
        tokio::task::spawn_blocking(move || {
            notify(OtaEvent::Found(crate::source::offers(&sources, &wanted)));
        });
    }

    /// A scan finished.
    pub fn scanned(&mut self) {
        self.scanning = false;
    }

    /// The receipt of an update that reached its slot: the slot names the bundle's digest.
    fn target_receipt(&self, target: &Target, result: &str, reason: &str) -> Due {
        let digest = self.state.slot(target.slot).bundle_digest.clone();
        self.receipt(
            target.bundle.as_ref(),
            digest,
            &target.version,
            result,
            reason,
        )
    }

    /// A receipt of the update begun at the last `spawn_install`, ending now.
    fn receipt(
        &self,
        bundle: Option<&Offer>,
        bundle_digest: Option<String>,
        to: &str,
        result: &str,
        reason: &str,
    ) -> Due {
        let receipt = crate::receipt::Receipt {
            device: String::new(),
            from: self.from.clone(),
            bundle_digest,
            to: to.to_owned(),
            result: result.to_owned(),
            reason: reason.to_owned(),
            bundle: bundle.and_then(Offer::file_name),
            started_at: self.started_at,
            finished_at: unix_now(),
            resumed_bytes: self.resumed,
            unchanged_bytes: self.unchanged,
        };
        receipt_due(&self.layout, receipt, bundle)
    }

    /// Saves `next`, the outcome of a trial, with its receipt due, then writes the receipt
    /// (see [`Agent::write_due`]; the machine hears [`Event::Recorded`] when it is written).
    /// Not saved: logged, no receipt (the outcome it would report is not the device's), and
    /// `Recorded` at once.
    fn record_outcome(
        &mut self,
        next: Result<State, ota_slots::Refused>,
        due: Due,
        what: &str,
    ) -> Option<Event> {
        let json = due.to_json();
        match self.persist(next.map(|s| s.with_receipt_due(json))) {
            Ok(()) => {
                self.write_due(due, true);
                None
            }
            Err(error) => {
                tracing::error!(%error, "cannot record the {what}");
                Some(Event::Recorded)
            }
        }
    }

    /// Writes `due` into `<ota>/receipts/`, and into `receipts/` beside the bundle when that
    /// directory is writable or `remount_sticks` may make it so (a USB stick carries the
    /// fleet's audit trail back). Written on a blocking task, never on the dispatcher's loop
    /// (which alone feeds the watchdogs: a slow stick must not get the device reset); reports
    /// [`OtaEvent::Recorded`], upon which the receipt due in the state (`is_due`: this is it)
    /// is marked written if it was.
    fn write_due(&self, due: Due, is_due: bool) {
        let key = self.layout.dir.join("device.key");
        let remount_under = self.remount_under();
        let notify = Arc::clone(&self.notify);
        tokio::task::spawn_blocking(move || {
            let result = due.receipt.result.clone();
            let written = crate::receipt::write(&key, due.receipt, &due.dirs, &remount_under);
            match (&written, &due.report) {
                (Err(error), _) => tracing::warn!(%error, "cannot write the install receipt"),
                // The depot that offered the bundle hears the outcome now; if it cannot, it
                // hears it from the next poll (the version that runs, or this receipt again).
                (Ok(text), Some(offer)) => crate::depot::post_receipt(offer, &key, text, &result),
                (Ok(_), None) => {}
            }
            notify(OtaEvent::Recorded {
                due_written: is_due && written.is_ok(),
            });
        });
    }

    fn remount_under(&self) -> Vec<PathBuf> {
        if self.settings.remount_sticks {
            self.settings.inbox.clone()
        } else {
            Vec::new()
        }
    }
}

/// The depot a refusal is reported to: the one that offered the bundle, unless the bundle is
/// not to blame (a download that stalled, a write error): that is no outcome, and the depot
/// offers it again at the next poll.
fn refusal_report(bundle: &Offer, refusal: &Refusal) -> Option<DepotOffer> {
    match bundle {
        Offer::Depot(offer) if !refusal.offer_again => Some(DepotOffer::clone(offer)),
        _ => None,
    }
}

/// `receipt`, to go into `<ota>/receipts/` and beside `bundle`.
fn receipt_due(layout: &Layout, receipt: crate::receipt::Receipt, bundle: Option<&Offer>) -> Due {
    let mut dirs = vec![layout.dir.join("receipts")];
    if let Some(parent) = bundle
        .and_then(Offer::path)
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
    {
        dirs.push(parent.join("receipts"));
    }
    let report = match bundle {
        Some(Offer::Depot(offer)) => Some(DepotOffer::clone(offer)),
        _ => None,
    };
    Due {
        receipt,
        dirs,
        report,
    }
}

/// A receipt the last run saved as due and did not get to write (a cut came first): written
/// now on the device, then marked written. Failures are logged, never fatal; a receipt that
/// cannot be written stays due.
fn write_receipt_due(layout: &Layout, file: &StateFile, state: State) -> State {
    let Some(json) = state.receipt_due.clone() else {
        return state;
    };
    // The device's copy only: at start a stick is not mounted yet (its directory would be
    // made on the tmpfs below the mount point), and a stick that hangs must not hold up the
    // start while the hardware watchdog runs. The copy on the device is what a fleet collects.
    let written = Due::from_json(&json)
        .map_err(|e| e.to_string())
        .and_then(|due| {
            let dirs: Vec<PathBuf> = due.dirs.first().cloned().into_iter().collect();
            crate::receipt::write(&layout.dir.join("device.key"), due.receipt, &dirs, &[])
                .map_err(|e| e.to_string())
        });
    match written {
        Ok(_) => {
            tracing::info!("a receipt due from before the last stop was written on the device");
            match file.save(&mut RealFs, &state.receipt_written()) {
                Ok(saved) => saved,
                Err(error) => {
                    tracing::warn!(%error, "cannot mark the receipt written; written again (once) at the next start");
                    state
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, "a receipt due from before the last stop cannot be written; it stays due");
            state
        }
    }
}

/// An interrupted install is kept when the journal lets it resume, else abandoned (the slot
/// emptied, the bundle offered again).
fn settle_installs(
    layout: &Layout,
    file: &StateFile,
    mut state: State,
) -> Result<State, UpdateError> {
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
    Ok(state)
}

/// A trial found at start is counted, then tried again or, after `max_trial_boots` starts,
/// rolled back at once (the database restored by the previous release first).
fn settle_trial(
    layout: &Layout,
    settings: &Settings,
    release_command: &ReleaseCommand,
    file: &StateFile,
    mut state: State,
    timings: Timings,
) -> Result<(State, Machine), UpdateError> {
    let Some(trial) = state.trial.clone() else {
        return Ok((state, Machine::new(timings)));
    };
    state = file.save(&mut RealFs, &state.restart_trial()?)?;
    let version = state.slot(trial.slot).version.clone().unwrap_or_default();
    match after_restart(&version, trial.attempts + 1, settings.max_trial_boots) {
        Restart::RollBack(reason) => {
            tracing::error!(%reason, "rolling back at start");
            let previous = state.previous.unwrap_or(Release::Factory);
            let dir = release_dir(previous, layout, &settings.factory_bin);
            if let Err(error) = restore_database(layout, release_command, &dir) {
                tracing::error!(%error, "the database could not be restored from the snapshot");
            }
            // Its receipt, due with the outcome: written by `write_receipt_due` right after,
            // with what the trial kept across the starts.
            let due = receipt_due(
                layout,
                crate::receipt::Receipt {
                    device: String::new(),
                    from: version_of(&state, previous),
                    bundle_digest: state.slot(trial.slot).bundle_digest.clone(),
                    to: version.clone(),
                    result: "rolled_back".to_owned(),
                    reason: reason.clone(),
                    bundle: None,
                    started_at: trial.started_at,
                    finished_at: unix_now(),
                    resumed_bytes: trial.resumed_bytes,
                    unchanged_bytes: trial.unchanged_bytes,
                },
                None,
            );
            let next = state.rollback(&reason)?.with_receipt_due(due.to_json());
            state = file.save(&mut RealFs, &next)?;
            Ok((state, Machine::new(timings)))
        }
        Restart::Retry => {
            tracing::warn!(%version, attempt = trial.attempts + 1, "the supervisor restarted during a trial: trying again");
            let target = Target {
                slot: trial.slot,
                version,
                issued_at: 0,
                bundle: None,
            };
            Ok((state, Machine::resuming(timings, target, Instant::now())))
        }
    }
}

/// The version of `release` in `state`, `factory` for the one shipped with the device.
fn version_of(state: &State, release: Release) -> String {
    match release {
        Release::Factory => "factory".to_owned(),
        Release::Slot(slot) => state
            .slot(slot)
            .version
            .clone()
            .unwrap_or_else(|| "unknown".to_owned()),
    }
}

/// The slot state's last outcome as `status` shows it.
fn update_result(outcome: &Outcome) -> UpdateResult {
    let (result, version, reason) = match outcome {
        Outcome::Committed { version } => (UpdateOutcome::Committed, version, None),
        Outcome::RolledBack { version, reason } => {
            (UpdateOutcome::RolledBack, version, Some(reason.clone()))
        }
        Outcome::InstallFailed { version, reason } => {
            (UpdateOutcome::InstallFailed, version, Some(reason.clone()))
        }
    };
    UpdateResult {
        result,
        version: version.clone(),
        reason,
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    //! The driver on a real data directory: what the machine decides is saved, shown and
    //! carried out. (The transitions themselves are tested in `machine_tests.rs`.)

    use std::sync::mpsc;

    use super::*;

    #[test]
    fn the_database_tools_files_go_in_ota_or_side_by_side_in_database_dir() {
        let layout = Layout::new(Path::new("/data"));
        assert_eq!(
            (layout.snapshot(), layout.rollback()),
            (
                "/data/ota/snapshot/quotes.db".into(),
                "/data/ota/rollback".into()
            )
        );
        // Nothing below the replicas' directory but files: it alone must exist.
        let layout = layout.with_database_dir(Path::new("/data/db"));
        assert_eq!(
            (layout.snapshot(), layout.rollback()),
            ("/data/db/snapshot.db".into(), "/data/db".into())
        );
        assert_eq!(layout.dir, Path::new("/data/ota"), "the OTA state stays");
    }

    #[test]
    fn opening_makes_ota_and_its_slots_searchable_but_not_listable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let _ = open(dir.path());
        for path in ["ota", "ota/slots"] {
            let mode = std::fs::metadata(dir.path().join(path))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o711, "{path}: {mode:o}");
        }
    }

    /// An agent on an empty data directory (factory release, idle), and where its tasks report.
    fn open(dir: &Path) -> (Agent, mpsc::Receiver<OtaEvent>) {
        let settings = crate::SettingsFile::default()
            .validate(dir, dir.to_owned())
            .unwrap();
        let command = ReleaseCommand::new(|_| std::process::Command::new("false"));
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let notify: Notify = Arc::new(move |event| {
            let _ = tx.lock().unwrap().send(event);
        });
        let agent = Agent::open(
            Layout::new(dir),
            settings,
            dir.join("keys"),
            command,
            notify,
        );
        (agent.unwrap(), rx)
    }

    /// An agent whose inactive slot holds release 2.0.0, switched to and on trial (revision
    /// 1), as the switch leaves it; `t0` is when the rollout started.
    fn on_trial(dir: &Path, t0: Instant) -> (Agent, mpsc::Receiver<OtaEvent>, SlotName) {
        let (mut agent, rx) = open(dir);
        let (state, slot) = agent.state.begin_install("d1", "2.0.0", 2).unwrap();
        let state = state.finish_install(slot).unwrap();
        agent.state = agent.file.save(&mut RealFs, &state).unwrap();
        let target = Target {
            slot,
            version: "2.0.0".into(),
            issued_at: 5,
            bundle: None,
        };
        agent
            .machine
            .handle(
                Event::Install {
                    bundle: PathBuf::from("/b").into(),
                },
                t0,
            )
            .unwrap();
        agent
            .machine
            .handle(Event::Installed(Ok(target)), t0)
            .unwrap();
        // The switch is the driver's: saved before the rollout starts.
        assert_eq!(
            agent.drive(Event::Snapshotted(Ok(())), t0),
            Ok(Step::RollOut(1))
        );
        assert_eq!(agent.state.active, Release::Slot(slot));
        (agent, rx, slot)
    }

    fn last_result(agent: &Agent) -> (UpdateOutcome, String) {
        let r = agent.status().last_result.expect("a result");
        (r.result, r.version)
    }

    /// The next event the agent's tasks report.
    fn next(rx: &mpsc::Receiver<OtaEvent>) -> OtaEvent {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("an event within 30 s")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_repository_test_key_constant_is_the_committed_public_key() {
        let line = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../ota/keys/test-signing.pub"
        ))
        .unwrap();
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(crate::trust::REPOSITORY_TEST_KEY)
        );
        // The device's console warns by the same key.
        let welcome = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../image/overlay/usr/lib/quote-edge/welcome"
        ))
        .unwrap();
        assert!(welcome.contains(crate::trust::REPOSITORY_TEST_KEY));
    }

    #[test]
    fn the_agent_refuses_to_start_trusting_the_test_key_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../ota/keys/test-signing.pub"
            ),
            keys.join("vendor.pub"),
        )
        .unwrap();
        let command = || ReleaseCommand::new(|_| std::process::Command::new("false"));
        let notify: Notify = Arc::new(|_| {});
        let settings = |allow: bool| {
            crate::SettingsFile {
                allow_test_key: Some(allow),
                ..Default::default()
            }
            .validate(dir.path(), dir.path().to_owned())
            .unwrap()
        };
        let layout = Layout::new(dir.path());
        let refused = Agent::open(
            layout.clone(),
            settings(false),
            keys.clone(),
            command(),
            notify.clone(),
        )
        .unwrap_err();
        assert!(
            matches!(&refused, UpdateError::TestKeyTrusted { dir, .. } if *dir == keys),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("allow_test_key = true"),
            "{refused}"
        );
        assert!(!layout.dir.exists(), "nothing written before the refusal");
        let allowed = Agent::open(layout, settings(true), keys, command(), notify);
        assert!(allowed.is_ok());
    }

    #[test]
    fn a_committed_trial_is_saved_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, rx, slot) = on_trial(dir.path(), t0);
        let rt = runtime();
        let _in_runtime = rt.enter();
        assert_eq!(agent.version_of_revision(1).as_deref(), Some("2.0.0"));
        let trial = agent.settings.trial;
        let (ready, none) = (|_| true, |_| None);
        assert_eq!(agent.watch(ready, none, t0), Step::None);
        assert_eq!(agent.status().state, UpdateState::Trial);
        assert_eq!(agent.watch(ready, none, t0 + trial), Step::None);
        assert_eq!(agent.status().state, UpdateState::Checking);
        // No health commands are configured, so they pass.
        let event = next(&rx);
        assert!(
            matches!(event, OtaEvent::HealthChecked(Ok(()))),
            "{event:?}"
        );
        assert_eq!(agent.on_event(event, t0 + trial), Step::None);
        // Committed and saved; idle once the receipt is written, off the loop.
        assert_eq!(agent.status().state, UpdateState::Recording);
        assert_eq!(agent.state.active, Release::Slot(slot));
        let recorded = next(&rx);
        assert!(
            matches!(recorded, OtaEvent::Recorded { due_written: true }),
            "{recorded:?}"
        );
        assert_eq!(agent.on_event(recorded, t0 + trial), Step::None);
        assert!(agent.is_idle());
        let receipts = std::fs::read_dir(dir.path().join("ota/receipts")).unwrap();
        assert_eq!(receipts.count(), 1, "the receipt is written before idle");
        assert_eq!(
            last_result(&agent),
            (UpdateOutcome::Committed, "2.0.0".into())
        );
        assert_eq!(agent.status().security_version, 2);
        // Committed on disk too: a restart finds no trial to resume.
        let (reopened, _) = open(dir.path());
        assert_eq!(reopened.running_version(), "2.0.0");
        assert!(reopened.state.trial.is_none());
        assert!(reopened.is_idle());
    }

    #[test]
    fn a_failing_replica_rolls_back_and_the_previous_release_runs_again() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, rx, _) = on_trial(dir.path(), t0);
        let rt = runtime();
        let _in_runtime = rt.enter();
        let failed = |_| Some("replica-3 exited with code 3".to_owned());
        // A new model revision for the previous release: every replica is recreated.
        assert_eq!(agent.watch(|_| false, failed, t0), Step::Recreate(2));
        assert!(agent.draining());
        assert_eq!(agent.status().state, UpdateState::RollingBack);
        assert_eq!(agent.version_of_revision(2).as_deref(), Some("factory"));
        assert_eq!(agent.drained(t0), Step::None);
        // No snapshot was taken in this test: the restore fails, and says so in the result.
        let event = next(&rx);
        let OtaEvent::Restored(result) = event else {
            panic!("the restore reports Restored: {event:?}")
        };
        assert!(
            matches!(result, Err(DatabaseError::NoSnapshot(_))),
            "{result:?}"
        );
        // The previous release starts at once; the receipt is written meanwhile.
        assert_eq!(agent.on_event(OtaEvent::Restored(result), t0), Step::Resume);
        assert_eq!(agent.status().state, UpdateState::Recording);
        assert_eq!(agent.on_event(next(&rx), t0), Step::None);
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
    fn a_trial_found_at_start_is_retried_then_rolled_back_after_max_trial_boots() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, _rx, slot) = on_trial(dir.path(), Instant::now());
        let max = agent.settings.max_trial_boots;
        drop(agent);
        for start in 1..max {
            let (agent, _) = open(dir.path());
            assert_eq!(
                agent.status().state,
                UpdateState::RollingOut,
                "start {start}"
            );
            assert_eq!(agent.state.active, Release::Slot(slot));
            assert_eq!(agent.version_of_revision(0).as_deref(), Some("2.0.0"));
        }
        let (agent, _) = open(dir.path());
        assert!(agent.is_idle());
        assert_eq!(agent.state.active, Release::Factory);
        let reason = agent.status().last_result.unwrap().reason.unwrap();
        assert!(
            reason.contains(&format!("on trial through {max} supervisor starts")),
            "{reason}"
        );
    }

    #[test]
    fn an_event_of_another_phase_never_erases_a_trial() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let (mut agent, _rx, _) = on_trial(dir.path(), t0);
        assert_eq!(
            agent.on_event(OtaEvent::Snapshotted(Ok(())), t0),
            Step::None
        );
        assert_eq!(
            agent.on_event(OtaEvent::HealthChecked(Ok(())), t0),
            Step::None
        );
        assert_eq!(agent.on_event(OtaEvent::Restored(Ok(())), t0), Step::None);
        assert_eq!(agent.drained(t0), Step::None);
        assert_eq!(agent.status().state, UpdateState::RollingOut);
        assert_eq!(agent.machine.trial_revision(), Some(1));
        assert!(agent.state.trial.is_some());
    }

    #[test]
    fn an_install_during_a_trial_is_refused_naming_the_phase() {
        let dir = tempfile::tempdir().unwrap();
        let (mut agent, _rx, _) = on_trial(dir.path(), Instant::now());
        let refused = agent.start_install(dir.path().join("x.bundle").into());
        assert_eq!(
            refused,
            Err(NotIdle {
                phase: UpdateState::RollingOut
            })
        );
        assert_eq!(agent.machine.trial_revision(), Some(1));
    }

    /// A source that offers what it is given, and records what it was asked for.
    #[derive(Debug, Default)]
    struct Depot {
        offer: Vec<Offer>,
        asked: std::sync::Mutex<Vec<Wanted>>,
    }

    impl Source for Depot {
        fn offers(&self, wanted: &Wanted) -> Vec<Offer> {
            self.asked.lock().unwrap().push(wanted.clone());
            self.offer.clone()
        }
    }

    #[test]
    fn a_scan_passes_on_an_added_sources_offers_and_tells_it_what_the_device_wants() {
        let dir = tempfile::tempdir().unwrap();
        let (mut agent, rx) = open(dir.path());
        // A file in the inbox shorter than a bundle's header (perhaps still being copied): the
        // inbox, asked first, offers nothing yet; the added source's offer is passed on.
        let inbox = dir.path().join("ota").join("inbox");
        std::fs::create_dir_all(&inbox).unwrap();
        std::fs::write(inbox.join("a.bundle"), b"not a bundle").unwrap();
        let depot = Arc::new(Depot {
            offer: vec![PathBuf::from("/var/cache/depot/b.bundle").into()],
            ..Depot::default()
        });
        agent.add_source(depot.clone());
        let event = runtime().block_on(async {
            agent.scan();
            rx.recv_timeout(Duration::from_secs(30)).unwrap()
        });
        let OtaEvent::Found(found) = event else {
            panic!("a scan reports Found: {event:?}");
        };
        assert_eq!(
            found,
            vec![PathBuf::from("/var/cache/depot/b.bundle").into()]
        );
        let asked = depot.asked.lock().unwrap();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].product, agent.settings.product);
        assert_eq!(asked[0].floor, 0);
        assert_eq!(asked[0].running, "factory");
    }

    #[test]
    fn a_depot_hears_of_a_refusal_only_when_the_bundle_is_to_blame() {
        let offer = DepotOffer {
            depot: "http://depot:8088".into(),
            rollout: 3,
            version: "2.0.0".into(),
            digest: "ab".repeat(32),
            bundle_path: format!("/bundles/{}.bundle", "ab".repeat(32)),
            size: 10,
        };
        let bundle = Offer::Depot(Box::new(offer.clone()));
        let refusal = |offer_again| Refusal {
            reason: "why".into(),
            slot_touched: false,
            offer_again,
        };
        assert_eq!(refusal_report(&bundle, &refusal(false)), Some(offer));
        assert_eq!(
            refusal_report(&bundle, &refusal(true)),
            None,
            "a stalled download"
        );
        let file = Offer::File(PathBuf::from("/media/stick/x.bundle"));
        assert_eq!(refusal_report(&file, &refusal(false)), None);
    }

    #[test]
    fn a_bundle_refused_at_the_door_is_shown_and_offered_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let (mut agent, rx) = open(dir.path());
        let rt = runtime();
        let _in_runtime = rt.enter();
        let bundle = dir.path().join("x.bundle");
        std::fs::write(&bundle, b"not a bundle").unwrap();
        agent.start_install(bundle.clone().into()).unwrap();
        assert_eq!(agent.status().state, UpdateState::Installing);
        assert_eq!(agent.on_event(next(&rx), Instant::now()), Step::None);
        assert_eq!(agent.status().state, UpdateState::Recording);
        assert_eq!(agent.on_event(next(&rx), Instant::now()), Step::None);
        assert!(agent.is_idle());
        let result = agent.status().last_result.expect("a result");
        assert_eq!(result.result, UpdateOutcome::Refused);
        assert_eq!(result.version, bundle.display().to_string());
        assert!(
            agent.judged.contains_key(&bundle),
            "judged, not offered again"
        );
        assert_eq!(agent.state.active, Release::Factory);
    }
}
