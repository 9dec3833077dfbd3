//! The `[ota]` table of the supervisor's configuration file, and the agent's validated settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `[ota]` as written: every field optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    /// Directories scanned for `*.bundle` files besides `<data_dir>/ota/inbox` (default none;
    /// on the device, where a USB stick is mounted).
    pub inbox: Option<Vec<PathBuf>>,
    /// How often the inboxes are scanned (default 2s).
    #[serde(default, with = "humantime_serde")]
    pub scan_interval: Option<Duration>,
    /// The product a bundle must be built for (default `quote-edge`).
    pub product: Option<String>,
    /// How long every replica of a new release must stay ready and live (default 10s).
    #[serde(default, with = "humantime_serde")]
    pub trial: Option<Duration>,
    /// Rollout plus trial must end within this, or the update is rolled back (default 120s).
    #[serde(default, with = "humantime_serde")]
    pub trial_deadline: Option<Duration>,
    /// Commands that must exit 0 at the end of the trial (default none).
    pub health_commands: Option<Vec<Vec<String>>>,
    /// Supervisor starts during one trial before the trial release is rolled back at boot
    /// (default 3).
    pub max_trial_boots: Option<u32>,
    /// How far one update may raise the anti-rollback floor (default 100): a bundle whose
    /// `security_version` is further above the committed one is refused, so that one leaked
    /// release key cannot push the floor to the top of the range and lock every later release out.
    pub max_security_step: Option<u64>,
    /// Directory of the factory release's programs (default: the supervisor's own directory).
    pub factory_bin: Option<PathBuf>,
    /// Remount a read-only stick read-write just long enough to write the install receipt
    /// next to its bundle, then read-only again (default false; needs CAP_SYS_ADMIN).
    pub remount_sticks: Option<bool>,
    /// A directory where the release's database tool writes the update's snapshot
    /// (`snapshot.db`) and a rollback's exports (`<time>-trial-quotes.jsonl`), instead of
    /// `<data_dir>/ota/snapshot/quotes.db` and `<data_dir>/ota/rollback/` (the default). When
    /// the replicas run as their own user (`service.user`): a directory that user can write and
    /// the supervisor can search (mode 0711), since the tool runs as that user and cannot enter
    /// `<data_dir>/ota`.
    pub database_dir: Option<PathBuf>,
    /// Start even though the trusted keys include the repository's test key, whose secret is
    /// public (default false: the supervisor refuses to start). Development images only.
    pub allow_test_key: Option<bool>,
    /// A fleet depot (`ota-depot serve`) to poll for updates, `http://host:port` (default none:
    /// USB sticks and `ota apply` only). Plain HTTP: what is installed is checked against the
    /// trusted keys, whatever the transport.
    pub depot: Option<String>,
    /// How often the depot is polled, ±10% (default 5m).
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
}

/// How far one update may raise the anti-rollback floor unless `ota.max_security_step` says.
pub const DEFAULT_MAX_SECURITY_STEP: u64 = 100;

/// The OTA agent's settings, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub inbox: Vec<PathBuf>,
    pub scan_interval: Duration,
    pub product: String,
    pub trial: Duration,
    pub trial_deadline: Duration,
    pub health_commands: Vec<Vec<String>>,
    pub max_trial_boots: u32,
    pub max_security_step: u64,
    pub factory_bin: PathBuf,
    pub remount_sticks: bool,
    pub database_dir: Option<PathBuf>,
    pub allow_test_key: bool,
    pub depot: Option<String>,
    pub poll_interval: Duration,
}

/// A key of `[ota]` whose value cannot work, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`ota.{key}` {reason}")]
pub struct InvalidSetting {
    /// The key below `[ota]`.
    pub key: &'static str,
    pub reason: String,
}

impl SettingsFile {
    /// Fills in the defaults and checks every value. `own_dir` is the default `factory_bin`
    /// (the supervisor's own directory).
    pub fn validate(self, data_dir: &Path, own_dir: PathBuf) -> Result<Settings, InvalidSetting> {
        let invalid = |key, reason: String| InvalidSetting { key, reason };
        let mut inbox = vec![data_dir.join("ota").join("inbox")];
        inbox.extend(self.inbox.unwrap_or_default());
        let product = self.product.unwrap_or_else(|| "quote-edge".to_owned());
        if product.is_empty()
            || product.len() > 64
            || !product
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(invalid(
                "product",
                format!("must be 1 to 64 of [a-z0-9._-], got {product:?}"),
            ));
        }
        let trial = self.trial.unwrap_or(Duration::from_secs(10));
        let trial_deadline = self.trial_deadline.unwrap_or(Duration::from_secs(120));
        if trial_deadline <= trial {
            return Err(invalid(
                "trial_deadline",
                format!("({trial_deadline:?}) must be longer than ota.trial ({trial:?})"),
            ));
        }
        let health_commands = self.health_commands.unwrap_or_default();
        if health_commands.iter().any(|c| c.is_empty()) {
            return Err(invalid("health_commands", "holds an empty command".into()));
        }
        let max_trial_boots = self.max_trial_boots.unwrap_or(3);
        if max_trial_boots == 0 {
            return Err(invalid("max_trial_boots", "must be at least 1".into()));
        }
        let max_security_step = self.max_security_step.unwrap_or(DEFAULT_MAX_SECURITY_STEP);
        if max_security_step == 0 {
            return Err(invalid("max_security_step", "must be at least 1".into()));
        }
        if let Some(depot) = &self.depot {
            let rest = depot.strip_prefix("http://").unwrap_or("");
            let host = rest.trim_end_matches('/');
            if host.is_empty() || host.contains(['/', '?', '#', ' ']) {
                return Err(invalid(
                    "depot",
                    format!(
                        "must be http://HOST[:PORT] (plain HTTP: bundles are verified by their signatures), got {depot:?}"
                    ),
                ));
            }
        }
        let poll_interval = self.poll_interval.unwrap_or(Duration::from_secs(300));
        if poll_interval < Duration::from_secs(1) {
            return Err(invalid(
                "poll_interval",
                format!("({poll_interval:?}) must be at least 1s"),
            ));
        }
        Ok(Settings {
            inbox,
            scan_interval: self.scan_interval.unwrap_or(Duration::from_secs(2)),
            product,
            trial,
            trial_deadline,
            health_commands,
            max_trial_boots,
            max_security_step,
            factory_bin: self.factory_bin.unwrap_or(own_dir),
            remount_sticks: self.remount_sticks.unwrap_or(false),
            database_dir: self.database_dir,
            allow_test_key: self.allow_test_key.unwrap_or(false),
            depot: self.depot.map(|d| d.trim_end_matches('/').to_owned()),
            poll_interval,
        })
    }
}
