//! The slot state and its verbs. Each verb either returns the next state or refuses, naming
//! the state it was in; nothing is changed by a refused verb.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bundle digests remembered as failed, newest last.
pub const MAX_FAILED: usize = 32;
/// Used permits remembered; the oldest is forgotten first.
pub const MAX_USED_PERMITS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::A => "a",
            SlotName::B => "b",
        }
    }
}

/// Which release runs: the factory one, or a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "slot")]
pub enum Release {
    Factory,
    Slot(SlotName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotStatus {
    /// Nothing usable.
    Empty,
    /// Being written: never to be run, whatever its files say.
    Installing,
    /// Written and verified; may be switched to.
    Ready,
    /// Switched to and rolled back; kept for inspection until overwritten.
    Bad,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub status: SlotStatus,
    pub version: Option<String>,
    pub security_version: Option<u64>,
    pub bundle_digest: Option<String>,
    /// The downgrade permit that let this release in (its document id), used up at commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permit: Option<String>,
}

impl SlotInfo {
    fn empty() -> Self {
        SlotInfo {
            status: SlotStatus::Empty,
            version: None,
            security_version: None,
            bundle_digest: None,
            permit: None,
        }
    }
}

/// A release on probation after a switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub slot: SlotName,
    /// Starts of the trial release so far (counted by the agent, which gives up past a limit).
    pub attempts: u32,
    /// What the update's receipt reports, kept across starts: when it began (Unix seconds),
    /// the bytes its install resumed after a cut and those it found unchanged in the slot
    /// (0 in a state saved before these were kept).
    #[serde(default)]
    pub started_at: u64,
    #[serde(default)]
    pub resumed_bytes: u64,
    #[serde(default)]
    pub unchanged_bytes: u64,
}

/// How the last update ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Outcome {
    Committed { version: String },
    RolledBack { version: String, reason: String },
    InstallFailed { version: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format of this document.
    pub format: u32,
    /// Incremented on every save: the newest state wins.
    pub generation: u64,
    pub active: Release,
    /// What to roll back to during a trial.
    pub previous: Option<Release>,
    pub trial: Option<Trial>,
    pub slots: BTreeMap<SlotName, SlotInfo>,
    /// Digests of bundles that failed, so the same bundle is not retried in a loop.
    pub failed_bundles: Vec<String>,
    /// Anti-rollback: the highest committed security version and its issue time.
    pub highest_security_version: u64,
    pub highest_issued_at: u64,
    pub last_result: Option<Outcome>,
    /// Downgrade permits used up (document ids), so that one cannot lower the device twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_permits: Vec<String>,
    /// The receipt of the outcome recorded here, not yet written: the agent's own document,
    /// opaque to this crate. It is saved with the outcome in one atomic replace, so that a cut
    /// before the receipt is on disk leaves it due (written at the next start), and cleared
    /// once it is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_due: Option<String>,
}

/// A verb not allowed in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("an update is on trial in slot {0}; commit or roll back first")]
    TrialInProgress(&'static str),
    #[error("no update is on trial")]
    NoTrial,
    #[error("bundle {0} failed before; it will not be retried")]
    FailedBefore(String),
    #[error("slot {slot} is {status:?}, not {expected:?}")]
    WrongStatus {
        slot: &'static str,
        status: SlotStatus,
        expected: SlotStatus,
    },
    #[error("slot {0} is the active release")]
    Active(&'static str),
}

impl Default for State {
    fn default() -> Self {
        State::factory()
    }
}

impl State {
    /// A device fresh from the factory: both slots empty.
    pub fn factory() -> State {
        State {
            format: 1,
            generation: 0,
            active: Release::Factory,
            previous: None,
            trial: None,
            slots: [
                (SlotName::A, SlotInfo::empty()),
                (SlotName::B, SlotInfo::empty()),
            ]
            .into_iter()
            .collect(),
            failed_bundles: Vec::new(),
            used_permits: Vec::new(),
            highest_security_version: 0,
            highest_issued_at: 0,
            last_result: None,
            receipt_due: None,
        }
    }

    pub fn slot(&self, name: SlotName) -> &SlotInfo {
        self.slots.get(&name).expect("both slots always exist")
    }

    fn slot_mut(&mut self, name: SlotName) -> &mut SlotInfo {
        self.slots.entry(name).or_insert_with(SlotInfo::empty)
    }

    /// The slot an update goes to: the one not running.
    pub fn inactive(&self) -> SlotName {
        match self.active {
            Release::Slot(slot) => slot.other(),
            Release::Factory => SlotName::A,
        }
    }

    /// Step 1: mark the inactive slot `installing` (persist before writing a byte to it).
    pub fn begin_install(
        &self,
        digest: &str,
        version: &str,
        security_version: u64,
    ) -> Result<(State, SlotName), Refused> {
        if let Some(trial) = &self.trial {
            return Err(Refused::TrialInProgress(trial.slot.as_str()));
        }
        if self.failed_bundles.iter().any(|d| d == digest) {
            return Err(Refused::FailedBefore(digest.to_owned()));
        }
        let target = self.inactive();
        let mut next = self.clone();
        *next.slot_mut(target) = SlotInfo {
            status: SlotStatus::Installing,
            version: Some(version.to_owned()),
            security_version: Some(security_version),
            bundle_digest: Some(digest.to_owned()),
            permit: None,
        };
        Ok((next, target))
    }

    /// Records that the release being installed in `slot` came in on the downgrade permit
    /// `permit` (a document id); the commit uses the permit up.
    pub fn hold_permit(&self, slot: SlotName, permit: &str) -> Result<State, Refused> {
        self.expect(slot, SlotStatus::Installing)?;
        let mut next = self.clone();
        next.slot_mut(slot).permit = Some(permit.to_owned());
        Ok(next)
    }

    /// Step 2, after every file was written from verified chunks and synced: mark it `ready`.
    pub fn finish_install(&self, slot: SlotName) -> Result<State, Refused> {
        self.expect(slot, SlotStatus::Installing)?;
        let mut next = self.clone();
        next.slot_mut(slot).status = SlotStatus::Ready;
        Ok(next)
    }

    /// An install that failed on the bundle's bytes (a chunk that does not match its signed
    /// hash): the slot is emptied and the failure recorded as the last result. The release is
    /// not remembered as bad: a damaged copy says nothing about the release, and another copy
    /// of it may be installed. Only a release that failed its trial is remembered (`rollback`).
    pub fn fail_install(&self, slot: SlotName, reason: &str) -> Result<State, Refused> {
        self.expect(slot, SlotStatus::Installing)?;
        let mut next = self.clone();
        let info = next.slot_mut(slot);
        let version = info.version.clone().unwrap_or_default();
        *info = SlotInfo::empty();
        next.last_result = Some(Outcome::InstallFailed {
            version,
            reason: reason.to_owned(),
        });
        Ok(next)
    }

    /// An install that stopped for a reason that is not the bundle's (power cut, the stick
    /// pulled out, the agent restarted): the slot is emptied and the bundle may be offered again.
    pub fn abandon_install(&self, slot: SlotName) -> Result<State, Refused> {
        self.expect(slot, SlotStatus::Installing)?;
        let mut next = self.clone();
        *next.slot_mut(slot) = SlotInfo::empty();
        Ok(next)
    }

    /// Counts one more start of the trial release (the agent calls it when it starts up during
    /// a trial: a trial that keeps taking the device down is rolled back, not retried forever).
    pub fn restart_trial(&self) -> Result<State, Refused> {
        let mut next = self.clone();
        let trial = next.trial.as_mut().ok_or(Refused::NoTrial)?;
        trial.attempts += 1;
        Ok(next)
    }

    /// Step 3: run the ready slot, on trial.
    pub fn switch(&self, slot: SlotName) -> Result<State, Refused> {
        if let Some(trial) = &self.trial {
            return Err(Refused::TrialInProgress(trial.slot.as_str()));
        }
        if self.active == Release::Slot(slot) {
            return Err(Refused::Active(slot.as_str()));
        }
        self.expect(slot, SlotStatus::Ready)?;
        let mut next = self.clone();
        next.previous = Some(self.active);
        next.active = Release::Slot(slot);
        next.trial = Some(Trial {
            slot,
            attempts: 0,
            started_at: 0,
            resumed_bytes: 0,
            unchanged_bytes: 0,
        });
        Ok(next)
    }

    /// Step 4a: the trial passed. The slot becomes the release; anti-rollback moves up.
    pub fn commit(&self, issued_at: u64) -> Result<State, Refused> {
        let trial = self.trial.as_ref().ok_or(Refused::NoTrial)?;
        let mut next = self.clone();
        let info = next.slot(trial.slot).clone();
        let security_version = info.security_version.unwrap_or(0);
        if security_version > next.highest_security_version
            || (security_version == next.highest_security_version
                && issued_at > next.highest_issued_at)
        {
            next.highest_security_version = security_version;
            next.highest_issued_at = issued_at;
        }
        if let Some(permit) = next.slot_mut(trial.slot).permit.take() {
            next.used_permits.push(permit);
            if next.used_permits.len() > MAX_USED_PERMITS {
                next.used_permits.remove(0);
            }
        }
        next.trial = None;
        next.previous = None;
        next.last_result = Some(Outcome::Committed {
            version: info.version.unwrap_or_default(),
        });
        Ok(next)
    }

    /// Step 4b: the trial failed. The previous release runs again, the slot is marked bad, the
    /// bundle remembered as failed.
    pub fn rollback(&self, reason: &str) -> Result<State, Refused> {
        let trial = self.trial.as_ref().ok_or(Refused::NoTrial)?;
        let mut next = self.clone();
        next.active = self.previous.unwrap_or(Release::Factory);
        next.previous = None;
        next.trial = None;
        let info = next.slot_mut(trial.slot);
        info.status = SlotStatus::Bad;
        let version = info.version.clone().unwrap_or_default();
        let digest = info.bundle_digest.clone();
        next.remember_failed(digest);
        next.last_result = Some(Outcome::RolledBack {
            version,
            reason: reason.to_owned(),
        });
        Ok(next)
    }

    /// This state's trial with what its receipt will report (see [`Trial`]); no trial: as is.
    pub fn with_trial_report(mut self, started_at: u64, resumed: u64, unchanged: u64) -> State {
        if let Some(trial) = &mut self.trial {
            trial.started_at = started_at;
            trial.resumed_bytes = resumed;
            trial.unchanged_bytes = unchanged;
        }
        self
    }

    /// This state with `receipt` due: saved together, the outcome and its receipt.
    pub fn with_receipt_due(mut self, receipt: String) -> State {
        self.receipt_due = Some(receipt);
        self
    }

    /// The receipt that was due is written.
    pub fn receipt_written(&self) -> State {
        State {
            receipt_due: None,
            ..self.clone()
        }
    }

    fn expect(&self, slot: SlotName, expected: SlotStatus) -> Result<(), Refused> {
        let status = self.slot(slot).status;
        if status == expected {
            Ok(())
        } else {
            Err(Refused::WrongStatus {
                slot: slot.as_str(),
                status,
                expected,
            })
        }
    }

    fn remember_failed(&mut self, digest: Option<String>) {
        if let Some(digest) = digest
            && !self.failed_bundles.contains(&digest)
        {
            self.failed_bundles.push(digest);
            if self.failed_bundles.len() > MAX_FAILED {
                self.failed_bundles.remove(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_saved_before_trial_reports_and_due_receipts_still_loads() {
        let (state, slot) = installed(&State::factory(), "d", "2.0.0", 2);
        let state = state.switch(slot).unwrap().with_trial_report(7, 8, 9);
        let mut json: serde_json::Value = serde_json::to_value(&state).unwrap();
        let trial = json["trial"].as_object_mut().unwrap();
        for field in ["started_at", "resumed_bytes", "unchanged_bytes"] {
            assert!(trial.remove(field).is_some(), "{field} is saved");
        }
        let old: State = serde_json::from_value(json).unwrap();
        assert_eq!(
            old,
            state.with_trial_report(0, 0, 0),
            "the fields an older supervisor did not write read as 0"
        );
        assert_eq!(old.receipt_due, None);
    }

    fn installed(state: &State, digest: &str, version: &str, sv: u64) -> (State, SlotName) {
        let (s, slot) = state.begin_install(digest, version, sv).unwrap();
        (s.finish_install(slot).unwrap(), slot)
    }

    #[test]
    fn install_switch_commit_moves_the_release_and_anti_rollback() {
        let s = State::factory();
        let (s, slot) = installed(&s, "d1", "1.1", 3);
        assert_eq!(slot, SlotName::A);
        assert_eq!(
            s.active,
            Release::Factory,
            "installing never changes what runs"
        );
        let s = s.switch(slot).unwrap();
        assert_eq!(
            (s.active, s.previous),
            (Release::Slot(SlotName::A), Some(Release::Factory))
        );
        let s = s.commit(100).unwrap();
        assert_eq!(
            (
                s.trial.clone(),
                s.highest_security_version,
                s.highest_issued_at
            ),
            (None, 3, 100)
        );
        assert_eq!(
            s.inactive(),
            SlotName::B,
            "the next update goes to the other slot"
        );
    }

    #[test]
    fn rollback_restores_the_previous_release_and_remembers_the_bundle() {
        let (s, _) = installed(&State::factory(), "d1", "1.1", 1);
        let s = s.switch(SlotName::A).unwrap().commit(1).unwrap();
        let (s, slot) = installed(&s, "d2", "1.2", 2);
        assert_eq!(slot, SlotName::B);
        let s = s
            .switch(slot)
            .unwrap()
            .rollback("replicas crash-looped")
            .unwrap();
        assert_eq!(s.active, Release::Slot(SlotName::A));
        assert_eq!(s.slot(SlotName::B).status, SlotStatus::Bad);
        assert_eq!(
            s.highest_security_version, 1,
            "a rolled-back update does not move anti-rollback"
        );
        assert_eq!(
            s.begin_install("d2", "1.2", 2).unwrap_err(),
            Refused::FailedBefore("d2".into())
        );
    }

    #[test]
    fn verbs_out_of_order_are_refused_and_change_nothing() {
        let s = State::factory();
        assert!(matches!(
            s.switch(SlotName::A),
            Err(Refused::WrongStatus { .. })
        ));
        assert_eq!(s.commit(0), Err(Refused::NoTrial));
        assert_eq!(s.rollback("x"), Err(Refused::NoTrial));
        assert!(matches!(
            s.finish_install(SlotName::B),
            Err(Refused::WrongStatus { .. })
        ));
        let (s, slot) = installed(&s, "d1", "1.1", 1);
        let trial = s.switch(slot).unwrap();
        assert_eq!(
            trial.begin_install("d9", "9", 9).unwrap_err(),
            Refused::TrialInProgress("a")
        );
        assert_eq!(
            trial.switch(SlotName::A).unwrap_err(),
            Refused::TrialInProgress("a")
        );
    }

    #[test]
    fn an_abandoned_install_empties_the_slot_without_blaming_the_bundle() {
        let (s, slot) = State::factory().begin_install("d1", "1.1", 1).unwrap();
        let s = s.abandon_install(slot).unwrap();
        assert_eq!(s.slot(slot).status, SlotStatus::Empty);
        assert!(s.failed_bundles.is_empty());
        assert!(s.begin_install("d1", "1.1", 1).is_ok(), "offered again");
        assert_eq!(s.restart_trial(), Err(Refused::NoTrial));
    }

    #[test]
    fn a_permit_is_used_up_by_the_commit_not_before() {
        let (s, slot) = State::factory().begin_install("d1", "1.1", 1).unwrap();
        let s = s.hold_permit(slot, "p1").unwrap();
        // Held while installing and on trial (a cut there resumes with the same permit).
        let s = s.finish_install(slot).unwrap().switch(slot).unwrap();
        assert!(s.used_permits.is_empty());
        let s = s.commit(5).unwrap();
        assert_eq!(s.used_permits, vec!["p1".to_owned()]);
        assert_eq!(s.slot(slot).permit, None);
        assert!(matches!(
            State::factory().hold_permit(slot, "p1"),
            Err(Refused::WrongStatus { .. })
        ));
    }

    #[test]
    fn a_damaged_copy_does_not_blame_its_release() {
        let (s, slot) = State::factory().begin_install("d1", "1.1", 1).unwrap();
        let s = s.fail_install(slot, "chunk 3 does not match").unwrap();
        assert_eq!(s.slot(slot).status, SlotStatus::Empty);
        assert!(s.failed_bundles.is_empty());
        assert!(matches!(s.last_result, Some(Outcome::InstallFailed { .. })));
        assert!(
            s.begin_install("d1", "1.1", 1).is_ok(),
            "another copy may come"
        );
    }

    #[test]
    fn the_failed_list_is_bounded() {
        let mut s = State::factory();
        for i in 0..(MAX_FAILED + 5) {
            let digest = format!("d{i}");
            let (next, slot) = s.begin_install(&digest, "v", 0).unwrap();
            s = next
                .finish_install(slot)
                .unwrap()
                .switch(slot)
                .unwrap()
                .rollback("crashed")
                .unwrap();
        }
        assert_eq!(s.failed_bundles.len(), MAX_FAILED);
        assert_eq!(
            s.failed_bundles.last().unwrap(),
            &format!("d{}", MAX_FAILED + 4)
        );
    }
}
