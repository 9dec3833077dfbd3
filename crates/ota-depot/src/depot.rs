//! The depot's state and its verbs: the I/O driver of [`crate::gates`]. It holds everything in
//! memory, writes through to a [`Store`] before it answers, and changes its memory only after
//! the store said the write is durable: a failed write leaves both as they were.
//!
//! Trust: bundles and plans are verified against the release keys before they are kept; a
//! device is whoever holds its device key (requests are signed, `crate::server` checks that and
//! the nonce); its terminal reports carry its own signed receipt for the rollout's bundle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use depot_proto::wire::{
    BundleAccepted, DeviceStatus, Event, Member, MemberState, Offer, Poll, PollReply, Published,
    Report, ReportReply, RolloutState, RolloutStatus, Status, WaveState, WaveStatus,
};
use ota_bundle::{Bundle, PLAN_KIND, Plan, PublicKey, Receipt, SignedDoc, TrustedKeys};

use crate::gates::{self, Progress, Recent, WaveCount};
use crate::store::{Store, StoreError, StoredBundle, StoredDevice};

/// Why the depot refused, or failed.
#[derive(Debug, thiserror::Error)]
pub enum DepotError {
    /// The device is not on the allow-list (`--devices`).
    #[error("device {0} is not on the depot's allow-list")]
    NotEnrolled(String),
    #[error("{0}")]
    NotFound(String),
    /// Not allowed in the current state (a second active rollout, a resume of a running one).
    #[error("{0}")]
    Conflict(String),
    /// A bundle, plan or report that is not valid; the message names what and why.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Device {
    public: PublicKey,
    product: Option<String>,
    version: Option<String>,
    last_seen: u64,
}

#[derive(Debug, Clone, Copy)]
struct MemberRec {
    wave: u32,
    state: MemberState,
    seq: u64,
}

impl MemberRec {
    fn terminal(&self) -> bool {
        matches!(
            self.state,
            MemberState::Committed | MemberState::RolledBack | MemberState::Refused
        )
    }
}

#[derive(Debug)]
struct Rollout {
    id: u64,
    plan: Plan,
    plan_text: String,
    bundle_size: u64,
    progress: Progress,
    resume_mark: u64,
    members: BTreeMap<String, MemberRec>,
    bytes_served: u64,
    downloads: u64,
}

impl Rollout {
    fn active(&self) -> bool {
        matches!(
            self.progress.state,
            RolloutState::Running | RolloutState::Halted | RolloutState::Completed
        )
    }

    /// The gates' inputs, with `change` (a member's new state) applied on top.
    fn counts(&self, change: Option<(&str, MemberRec)>) -> (Vec<WaveCount>, Recent) {
        let mut waves = vec![WaveCount::default(); self.plan.waves.len()];
        let mut recent = Recent::default();
        let changed = change.map(|(d, _)| d);
        let members = self
            .members
            .iter()
            .filter(|(d, _)| Some(d.as_str()) != changed)
            .map(|(_, m)| *m)
            .chain(change.map(|(_, m)| m));
        for m in members {
            let wave = &mut waves[m.wave as usize];
            wave.size += 1;
            let failed = matches!(m.state, MemberState::RolledBack | MemberState::Refused);
            match m.state {
                MemberState::Committed => wave.committed += 1,
                _ if failed => wave.failed += 1,
                _ => {}
            }
            if m.terminal() && m.seq > self.resume_mark {
                recent.reported += 1;
                recent.failed += u32::from(failed);
            }
        }
        (waves, recent)
    }
}

/// The depot.
pub struct Depot {
    store: Box<dyn Store>,
    trusted: TrustedKeys,
    /// `--devices`: only these keys may enroll; `None` enrolls any key on first contact.
    allow: Option<BTreeMap<String, PublicKey>>,
    bundle_dir: PathBuf,
    devices: BTreeMap<String, Device>,
    bundles: BTreeMap<String, StoredBundle>,
    rollouts: Vec<Rollout>,
    last_seq: u64,
}

/// Verifies a bundle uploaded to `temp`: every signature and every chunk against `trusted`,
/// the file exactly as long as its manifest says. Slow for a big bundle, so it runs without
/// the depot's lock; [`Depot::add_bundle`] keeps it after. `temp` is removed when refused.
pub fn verify_upload(temp: &Path, trusted: &TrustedKeys) -> Result<StoredBundle, DepotError> {
    let result = verify(temp, trusted);
    if result.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    result
}

fn verify(temp: &Path, trusted: &TrustedKeys) -> Result<StoredBundle, DepotError> {
    let io = |source| DepotError::Io {
        path: temp.to_owned(),
        source,
    };
    let size = std::fs::metadata(temp).map_err(io)?.len();
    let file = std::fs::File::open(temp).map_err(io)?;
    let bundle = Bundle::open(std::io::BufReader::new(file), trusted)
        .map_err(|e| DepotError::Invalid(format!("the bundle is refused: {e}")))?;
    let manifest = bundle.manifest.clone();
    let digest = ota_bundle::manifest_digest(&bundle.manifest_bytes);
    if bundle.file_len() != size {
        return Err(DepotError::Invalid(format!(
            "the bundle is refused: it is {size} bytes, its manifest says {}",
            bundle.file_len()
        )));
    }
    bundle
        .chunks(|_, _, _| Ok::<(), std::convert::Infallible>(()))
        .map_err(|e| DepotError::Invalid(format!("the bundle is refused: {e}")))?;
    Ok(StoredBundle {
        digest,
        product: manifest.product,
        version: manifest.version,
        size,
    })
}

/// The file a verified bundle is served from, by its manifest digest.
pub fn bundle_file(digest: &str) -> String {
    format!("{digest}.bundle")
}

impl Depot {
    /// Loads the store. Every stored plan is verified again with the keys trusted now.
    pub fn open(
        mut store: Box<dyn Store>,
        trusted: TrustedKeys,
        allow: Option<Vec<PublicKey>>,
        bundle_dir: &Path,
    ) -> Result<Depot, DepotError> {
        let loaded = store.load()?;
        let mut depot = Depot {
            store,
            trusted,
            allow: allow.map(|keys| keys.into_iter().map(|k| (k.id().to_string(), k)).collect()),
            bundle_dir: bundle_dir.to_owned(),
            devices: BTreeMap::new(),
            bundles: loaded
                .bundles
                .into_iter()
                .map(|b| (b.digest.clone(), b))
                .collect(),
            rollouts: Vec::new(),
            last_seq: loaded.last_seq,
        };
        for d in loaded.devices {
            let public = PublicKey::from_hex(&d.public_key).map_err(|e| {
                DepotError::Invalid(format!("stored device {} has a bad key: {e}", d.id))
            })?;
            depot.devices.insert(
                d.id,
                Device {
                    public,
                    product: d.product,
                    version: d.version,
                    last_seen: d.last_seen,
                },
            );
        }
        for r in loaded.rollouts {
            let plan =
                Plan::verify_any_product(r.plan.as_bytes(), &depot.trusted).map_err(|e| {
                    DepotError::Invalid(format!(
                        "stored rollout {}'s plan no longer verifies with the trusted keys: {e}",
                        r.id
                    ))
                })?;
            let bundle_size = depot.bundles.get(&plan.bundle).map_or(0, |b| b.size);
            depot.rollouts.push(Rollout {
                id: r.id,
                plan,
                plan_text: r.plan,
                bundle_size,
                progress: r.progress,
                resume_mark: r.resume_mark,
                members: BTreeMap::new(),
                bytes_served: 0,
                downloads: 0,
            });
        }
        for m in loaded.members {
            if let Some(r) = depot.rollouts.iter_mut().find(|r| r.id == m.rollout) {
                r.members.insert(
                    m.device,
                    MemberRec {
                        wave: m.wave,
                        state: m.state,
                        seq: m.seq,
                    },
                );
            }
        }
        Ok(depot)
    }

    pub fn bundle_dir(&self) -> &Path {
        &self.bundle_dir
    }

    /// The keys bundles and plans are verified with (for [`verify_upload`], run without the
    /// depot's lock).
    pub fn trusted(&self) -> &TrustedKeys {
        &self.trusted
    }

    /// Keeps a bundle that [`verify_upload`] verified at `temp` (in the bundle directory's file
    /// system): renamed to its digest's name, then recorded. `temp` is removed whatever happens.
    pub fn add_bundle(
        &mut self,
        temp: &Path,
        stored: StoredBundle,
    ) -> Result<BundleAccepted, DepotError> {
        let result = self.keep(temp, stored);
        let _ = std::fs::remove_file(temp);
        result
    }

    fn keep(&mut self, temp: &Path, stored: StoredBundle) -> Result<BundleAccepted, DepotError> {
        let digest = stored.digest.clone();
        let target = self.bundle_dir.join(bundle_file(&digest));
        durable::persist(&mut durable::StdFs, temp, &target).map_err(|e| DepotError::Io {
            path: e.path,
            source: e.source,
        })?;
        self.store.add_bundle(&stored)?;
        let accepted = BundleAccepted {
            digest: digest.clone(),
            product: stored.product.clone(),
            version: stored.version.clone(),
            size: stored.size,
        };
        self.bundles.insert(digest, stored);
        Ok(accepted)
    }

    /// Starts a rollout from a signed plan whose bundle the depot holds.
    pub fn publish(&mut self, plan_bytes: &[u8]) -> Result<Published, DepotError> {
        let plan = Plan::verify_any_product(plan_bytes, &self.trusted)
            .map_err(|e| DepotError::Invalid(format!("the rollout plan is refused: {e}")))?;
        let key = SignedDoc::parse(plan_bytes, PLAN_KIND)
            .map_err(|e| DepotError::Invalid(e.to_string()))?
            .id();
        let bundle = self.bundles.get(&plan.bundle).ok_or_else(|| {
            DepotError::NotFound(format!(
                "the plan names bundle {}, which the depot does not hold: upload it first",
                plan.bundle
            ))
        })?;
        if bundle.product != plan.product || bundle.version != plan.version {
            return Err(DepotError::Invalid(format!(
                "the plan says {} {}, its bundle is {} {}",
                plan.product, plan.version, bundle.product, bundle.version
            )));
        }
        if let Some(active) = self.rollouts.iter().find(|r| {
            r.plan.product == plan.product
                && r.active()
                && r.progress.state != RolloutState::Completed
        }) {
            return Err(DepotError::Conflict(format!(
                "rollout {} ({} {}) is {}: abort it before publishing another for {}",
                active.id,
                active.plan.product,
                active.plan.version,
                active.progress.state.as_str(),
                plan.product
            )));
        }
        if let Some(same) = self.rollouts.iter().find(|r| {
            SignedDoc::parse(r.plan_text.as_bytes(), PLAN_KIND).is_ok_and(|d| d.id() == key)
        }) {
            return Err(DepotError::Conflict(format!(
                "this plan was already published as rollout {}",
                same.id
            )));
        }
        // The fleet at publish: devices seen with this product, and allow-listed ones not yet
        // seen. Later devices join the last wave.
        let mut fleet: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| d.product.as_deref() == Some(plan.product.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        if let Some(allow) = &self.allow {
            fleet.extend(
                allow
                    .keys()
                    .filter(|id| !self.devices.contains_key(*id))
                    .cloned(),
            );
        }
        let waves = gates::assign(&plan, &key, &fleet);
        let members: Vec<(String, u32)> = fleet
            .iter()
            .cloned()
            .zip(waves.iter().map(|&w| w as u32))
            .collect();
        let mut rollout = Rollout {
            id: 0,
            plan_text: String::from_utf8_lossy(plan_bytes).into_owned(),
            bundle_size: bundle.size,
            progress: Progress {
                state: RolloutState::Running,
                open: 1,
                reason: None,
            },
            resume_mark: self.last_seq,
            members: members
                .iter()
                .map(|(d, w)| {
                    (
                        d.clone(),
                        MemberRec {
                            wave: *w,
                            state: MemberState::Waiting,
                            seq: 0,
                        },
                    )
                })
                .collect(),
            plan,
            bytes_served: 0,
            downloads: 0,
        };
        let (counts, recent) = rollout.counts(None);
        rollout.progress = gates::decide(&rollout.plan, &counts, recent, &rollout.progress);
        rollout.id = self.store.add_rollout(
            &rollout.plan_text,
            &rollout.progress,
            rollout.resume_mark,
            &members,
        )?;
        let published = Published {
            id: rollout.id,
            version: rollout.plan.version.clone(),
            waves: counts.iter().map(|w| w.size).collect(),
        };
        tracing::info!(rollout = rollout.id, version = %rollout.plan.version, waves = ?published.waves, "rollout published");
        self.rollouts.push(rollout);
        Ok(published)
    }

    /// A signed poll from `public`: enrolls it (open enrollment or the allow-list), records what
    /// it runs, and offers the active rollout if its wave is open.
    pub fn poll(
        &mut self,
        public: &PublicKey,
        poll: &Poll,
        now: u64,
    ) -> Result<PollReply, DepotError> {
        let id = public.id().to_string();
        if poll.product.is_empty()
            || poll.product.len() > 64
            || poll.version.is_empty()
            || poll.version.len() > 64
        {
            return Err(DepotError::Invalid(
                "poll: `product` and `version` must be 1 to 64 characters".into(),
            ));
        }
        match self.devices.get(&id) {
            Some(device) if device.public != *public => {
                return Err(DepotError::Conflict(format!(
                    "device id {id} is enrolled with another key"
                )));
            }
            Some(_) => self.store.seen(&id, &poll.product, &poll.version, now)?,
            None => {
                if let Some(allow) = &self.allow
                    && allow.get(&id) != Some(public)
                {
                    return Err(DepotError::NotEnrolled(id));
                }
                self.store.enroll(&StoredDevice {
                    id: id.clone(),
                    public_key: public.to_hex(),
                    product: Some(poll.product.clone()),
                    version: Some(poll.version.clone()),
                    enrolled_at: now,
                    last_seen: now,
                })?;
                tracing::info!(device = %id, product = %poll.product, version = %poll.version, "device enrolled");
            }
        }
        self.devices.insert(
            id.clone(),
            Device {
                public: public.clone(),
                product: Some(poll.product.clone()),
                version: Some(poll.version.clone()),
                last_seen: now,
            },
        );
        let Some(index) = self
            .rollouts
            .iter()
            .rposition(|r| r.plan.product == poll.product && r.active())
        else {
            return Ok(PollReply {
                device: id,
                offer: None,
            });
        };
        // A device that enrolled after the publish joins the last wave.
        if !self.rollouts[index].members.contains_key(&id) {
            let rollout = &self.rollouts[index];
            let wave = (rollout.plan.waves.len() - 1) as u32;
            self.store.add_member(rollout.id, &id, wave)?;
            let rollout = &mut self.rollouts[index];
            rollout.members.insert(
                id.clone(),
                MemberRec {
                    wave,
                    state: MemberState::Waiting,
                    seq: 0,
                },
            );
            let (counts, recent) = rollout.counts(None);
            let next = gates::decide(&rollout.plan, &counts, recent, &rollout.progress);
            if next != rollout.progress {
                self.store
                    .set_progress(rollout.id, &next, rollout.resume_mark)?;
                rollout.progress = next;
            }
        }
        // A device that already runs the rollout's version (its commit report was lost, or it
        // was updated from a stick) says so in a signed poll: that is its outcome.
        let member = self.rollouts[index].members[&id];
        if poll.version == self.rollouts[index].plan.version && !member.terminal() {
            self.record(index, &id, member, MemberState::Committed, None, now)?;
            return Ok(PollReply {
                device: id,
                offer: None,
            });
        }
        let rollout = &mut self.rollouts[index];
        let member = rollout.members.get_mut(&id).expect("added above");
        let open = rollout.progress.state == RolloutState::Running
            && (member.wave as usize) < rollout.progress.open;
        if !open || member.terminal() {
            return Ok(PollReply {
                device: id,
                offer: None,
            });
        }
        if member.state == MemberState::Waiting {
            member.state = MemberState::Offered;
        }
        Ok(PollReply {
            device: id,
            offer: Some(Offer {
                rollout: rollout.id,
                version: rollout.plan.version.clone(),
                plan: rollout.plan_text.clone(),
                bundle_path: format!("/bundles/{}", bundle_file(&rollout.plan.bundle)),
                bundle_size: rollout.bundle_size,
            }),
        })
    }

    /// A signed report from `public`. A terminal one must carry the device's own receipt for
    /// the rollout's bundle; it is recorded with the decision it causes, in one transaction.
    pub fn report(
        &mut self,
        public: &PublicKey,
        report: &Report,
        now: u64,
    ) -> Result<ReportReply, DepotError> {
        let id = public.id().to_string();
        if !self.devices.get(&id).is_some_and(|d| d.public == *public) {
            return Err(DepotError::NotEnrolled(id));
        }
        let rollout = self
            .rollouts
            .iter_mut()
            .find(|r| r.id == report.rollout)
            .ok_or_else(|| {
                DepotError::NotFound(format!("there is no rollout {}", report.rollout))
            })?;
        let member = *rollout.members.get(&id).ok_or_else(|| {
            DepotError::Invalid(format!("device {id} is not in rollout {}", rollout.id))
        })?;
        let Some(result) = report.event.receipt_result() else {
            // Progress: shown, never counted.
            if !member.terminal() {
                rollout.members.get_mut(&id).expect("member").state = MemberState::Installing;
            }
            return Ok(ReportReply { recorded: true });
        };
        let text = report.receipt.as_deref().ok_or_else(|| {
            DepotError::Invalid(format!(
                "a `{result}` report must carry the device's receipt"
            ))
        })?;
        let receipt = Receipt::verify(text.as_bytes(), &TrustedKeys::new([public.clone()], 1))
            .map_err(|e| DepotError::Invalid(format!("the receipt is refused: {e}")))?;
        if receipt.result != result {
            return Err(DepotError::Invalid(format!(
                "the report says {result}, its receipt says {}",
                receipt.result
            )));
        }
        if receipt.bundle_digest.as_deref() != Some(rollout.plan.bundle.as_str()) {
            return Err(DepotError::Invalid(format!(
                "the receipt is for bundle {}, rollout {} is bundle {}",
                receipt.bundle_digest.as_deref().unwrap_or("(none)"),
                rollout.id,
                rollout.plan.bundle
            )));
        }
        let state = match report.event {
            Event::Committed => MemberState::Committed,
            Event::RolledBack => MemberState::RolledBack,
            Event::Refused | Event::Installing => MemberState::Refused,
        };
        if member.terminal() {
            if member.state == state {
                return Ok(ReportReply { recorded: false });
            }
            return Err(DepotError::Conflict(format!(
                "device {id} already reported {:?} for rollout {}",
                member.state, rollout.id
            )));
        }
        let index = self
            .rollouts
            .iter()
            .position(|r| r.id == report.rollout)
            .expect("found above");
        self.record(index, &id, member, state, Some(text), now)?;
        Ok(ReportReply { recorded: true })
    }

    /// A member's outcome and the decision it causes: stored in one transaction, then applied.
    fn record(
        &mut self,
        index: usize,
        id: &str,
        member: MemberRec,
        state: MemberState,
        receipt: Option<&str>,
        now: u64,
    ) -> Result<(), DepotError> {
        let rollout = &mut self.rollouts[index];
        let changed = MemberRec {
            state,
            seq: self.last_seq + 1,
            ..member
        };
        let (counts, recent) = rollout.counts(Some((id, changed)));
        let next = gates::decide(&rollout.plan, &counts, recent, &rollout.progress);
        let seq = self
            .store
            .record(rollout.id, id, state, receipt, now, &next)?;
        self.last_seq = seq;
        rollout
            .members
            .insert(id.to_owned(), MemberRec { seq, ..changed });
        if next != rollout.progress {
            tracing::info!(rollout = rollout.id, state = next.state.as_str(), open = next.open, reason = ?next.reason, "rollout progressed");
        }
        rollout.progress = next;
        tracing::info!(rollout = rollout.id, device = %id, state = ?state, "outcome recorded");
        Ok(())
    }

    /// An operator's `halt`, `resume` or `abort`.
    pub fn control(&mut self, id: u64, verb: &str) -> Result<RolloutStatus, DepotError> {
        let last_seq = self.last_seq;
        let index = self
            .rollouts
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| DepotError::NotFound(format!("there is no rollout {id}")))?;
        let rollout = &self.rollouts[index];
        let state = rollout.progress.state;
        let (next, mark) = match (verb, state) {
            ("halt", RolloutState::Running | RolloutState::Completed) => (
                Progress {
                    state: RolloutState::Halted,
                    open: rollout.progress.open,
                    reason: Some("halted by the operator".into()),
                },
                rollout.resume_mark,
            ),
            ("resume", RolloutState::Halted) => {
                // Only reports from now on count against the error gate.
                let resumed = Progress {
                    state: RolloutState::Running,
                    open: rollout.progress.open,
                    reason: None,
                };
                let probe = Rollout {
                    resume_mark: last_seq,
                    ..clone_shape(rollout)
                };
                let (counts, recent) = probe.counts(None);
                (
                    gates::decide(&rollout.plan, &counts, recent, &resumed),
                    last_seq,
                )
            }
            ("abort", RolloutState::Running | RolloutState::Halted | RolloutState::Completed) => (
                Progress {
                    state: RolloutState::Aborted,
                    open: rollout.progress.open,
                    reason: Some("aborted by the operator".into()),
                },
                rollout.resume_mark,
            ),
            ("halt" | "resume" | "abort", state) => {
                return Err(DepotError::Conflict(format!(
                    "rollout {id} is {}: cannot {verb} it",
                    state.as_str()
                )));
            }
            (other, _) => {
                return Err(DepotError::NotFound(format!(
                    "no such verb {other:?} (halt, resume or abort)"
                )));
            }
        };
        self.store.set_progress(id, &next, mark)?;
        let rollout = &mut self.rollouts[index];
        rollout.progress = next;
        rollout.resume_mark = mark;
        tracing::info!(
            rollout = id,
            verb,
            state = rollout.progress.state.as_str(),
            "operator"
        );
        Ok(self.rollout_status(index))
    }

    /// Counts a bundle response (not a decision: kept in memory only).
    pub fn served(&mut self, digest: &str, bytes: u64) {
        for r in self.rollouts.iter_mut().filter(|r| r.plan.bundle == digest) {
            r.bytes_served += bytes;
            r.downloads += 1;
        }
    }

    fn rollout_status(&self, index: usize) -> RolloutStatus {
        let r = &self.rollouts[index];
        let (counts, _) = r.counts(None);
        RolloutStatus {
            id: r.id,
            product: r.plan.product.clone(),
            version: r.plan.version.clone(),
            bundle: r.plan.bundle.clone(),
            state: r.progress.state,
            reason: r.progress.reason.clone(),
            waves: counts
                .iter()
                .enumerate()
                .map(|(i, c)| WaveStatus {
                    size: c.size,
                    committed: c.committed,
                    failed: c.failed,
                    pending: c.pending(),
                    state: if i >= r.progress.open {
                        WaveState::Waiting
                    } else if c.pending() == 0 {
                        WaveState::Done
                    } else {
                        WaveState::Open
                    },
                })
                .collect(),
            bytes_served: r.bytes_served,
            downloads: r.downloads,
            members: r
                .members
                .iter()
                .map(|(d, m)| Member {
                    device: d.clone(),
                    wave: m.wave,
                    state: m.state,
                })
                .collect(),
        }
    }

    pub fn status(&self) -> Status {
        Status {
            rollouts: (0..self.rollouts.len())
                .rev()
                .map(|i| self.rollout_status(i))
                .collect(),
            devices: self.devices.len() as u32,
            fleet: self
                .devices
                .iter()
                .map(|(id, d)| DeviceStatus {
                    id: id.clone(),
                    version: d.version.clone(),
                    last_seen: d.last_seen,
                })
                .collect(),
        }
    }
}

/// A rollout's members and marks without its counters, to count as if resumed.
fn clone_shape(r: &Rollout) -> Rollout {
    Rollout {
        id: r.id,
        plan: r.plan.clone(),
        plan_text: String::new(),
        bundle_size: r.bundle_size,
        progress: r.progress.clone(),
        resume_mark: r.resume_mark,
        members: r.members.clone(),
        bytes_served: 0,
        downloads: 0,
    }
}
