//! The JSON bodies of the depot protocol. Every closed set of words is an enum, so a typo on
//! either side is an error, not a silently ignored state.

use serde::{Deserialize, Serialize};

/// `GET /api/v1/nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nonce {
    pub nonce: String,
}

/// `POST /api/v1/poll` (signed): what the device runs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub product: String,
    /// The version of the release running now.
    pub version: String,
}

/// The answer to a poll: an update to install, or none (`offer: null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollReply {
    pub device: String,
    pub offer: Option<Offer>,
}

/// An update offered to one device: everything in it is checked by the device against the
/// release keys before use (the plan's signatures, then the bundle's, then its manifest digest
/// against the plan's); the depot is trusted for scheduling only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub rollout: u64,
    pub version: String,
    /// The signed rollout plan's text (`ota rollout`), verified by the device.
    pub plan: String,
    /// The bundle's path on the depot (`/bundles/<manifest digest>.bundle`), a static file
    /// served with `Range` (resumable; any HTTP cache in front of the depot may serve it).
    pub bundle_path: String,
    pub bundle_size: u64,
}

/// What a device reports of one rollout (`POST /api/v1/report`, signed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The download and install started (shown on the status page; changes no gate).
    Installing,
    /// Committed: the receipt says `committed`.
    Committed,
    /// Rolled back after the switch: the receipt says `rolled_back`.
    RolledBack,
    /// Refused before anything was written: the receipt says `refused`.
    Refused,
}

impl Event {
    /// The receipt's `result` word a terminal event must carry; `None` for progress.
    pub fn receipt_result(self) -> Option<&'static str> {
        match self {
            Event::Installing => None,
            Event::Committed => Some("committed"),
            Event::RolledBack => Some("rolled_back"),
            Event::Refused => Some("refused"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub rollout: u64,
    pub event: Event,
    /// The device's signed install receipt (its text), required for every event but
    /// `installing`: its bundle digest must be the rollout's, its signer the device.
    #[serde(default)]
    pub receipt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportReply {
    /// False when the very same report was already recorded (a retry after a lost answer).
    pub recorded: bool,
}

/// `POST /api/v1/bundles` (operator): the bundle was verified and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleAccepted {
    pub digest: String,
    pub product: String,
    pub version: String,
    pub size: u64,
}

/// `POST /api/v1/rollouts` (operator): the plan was verified and its rollout started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub id: u64,
    pub version: String,
    /// How many devices each wave holds now (not cumulative).
    pub waves: Vec<u32>,
}

/// Every error body: what was wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Waves open as their gates are met.
    Running,
    /// Stopped by the error gate or an operator: nothing more is offered until `resume`.
    Halted,
    /// Every wave open and every device reported.
    Completed,
    /// Stopped for good by an operator.
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }

    pub fn parse(word: &str) -> Option<RolloutState> {
        [
            RolloutState::Running,
            RolloutState::Halted,
            RolloutState::Completed,
            RolloutState::Aborted,
        ]
        .into_iter()
        .find(|s| s.as_str() == word)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveState {
    /// Its gate is not met yet: its devices are offered nothing.
    Waiting,
    /// Its devices are offered the bundle.
    Open,
    /// Open, and every device in it reported.
    Done,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub rollouts: Vec<RolloutStatus>,
    /// Enrolled devices.
    pub devices: u32,
    pub fleet: Vec<DeviceStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub id: u64,
    pub product: String,
    pub version: String,
    pub bundle: String,
    pub state: RolloutState,
    /// Why it halted, in words (the error gate's counts, or "halted by the operator").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub waves: Vec<WaveStatus>,
    /// Bundle bytes the depot sent for this rollout's bundle, and in how many responses.
    pub bytes_served: u64,
    pub downloads: u64,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveStatus {
    /// Devices in this wave (not cumulative).
    pub size: u32,
    pub committed: u32,
    pub failed: u32,
    pub pending: u32,
    pub state: WaveState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Waiting,
    Offered,
    Installing,
    Committed,
    RolledBack,
    Refused,
}

impl MemberState {
    pub const ALL: [MemberState; 6] = [
        MemberState::Waiting,
        MemberState::Offered,
        MemberState::Installing,
        MemberState::Committed,
        MemberState::RolledBack,
        MemberState::Refused,
    ];

    /// Its word in the status JSON (and in the depot's database).
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Waiting => "waiting",
            MemberState::Offered => "offered",
            MemberState::Installing => "installing",
            MemberState::Committed => "committed",
            MemberState::RolledBack => "rolled_back",
            MemberState::Refused => "refused",
        }
    }

    pub fn parse(word: &str) -> Option<MemberState> {
        MemberState::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub device: String,
    /// Its wave, from 0.
    pub wave: u32,
    pub state: MemberState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub id: String,
    pub version: Option<String>,
    /// Unix seconds of its last signed request.
    pub last_seen: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_the_json_words() {
        for state in MemberState::ALL {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(MemberState::parse(state.as_str()), Some(state));
        }
        for state in [
            RolloutState::Running,
            RolloutState::Halted,
            RolloutState::Completed,
            RolloutState::Aborted,
        ] {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(RolloutState::parse(state.as_str()), Some(state));
        }
    }
}
