//! ota-agent: the OTA agent the supervisor links (one process on the device). It verifies a
//! bundle, installs it in the inactive A/B slot, has the running release snapshot the
//! database, switches, asks the supervisor to roll the replicas over, tries the new release,
//! then commits, or rolls back with the database restored. `agent.md` has the diagram.
//!
//! The supervisor drives it with events in and [`Step`]s out; it hands in a [`ReleaseCommand`]
//! (how a release's program runs), so this crate imports no process code.
//!
//! Architecture invariant: this crate never parses bundle bytes itself (`ota-bundle` does) and
//! never writes a slot but through `ota_slots::SlotWriter`.

mod agent;
mod database;
mod inbox;
mod install;
pub mod receipt;
mod settings;
mod trust;

pub use agent::{
    Agent, Installed, Layout, NotIdle, OtaEvent, Phase, Step, UpdateError, release_dir,
};
pub use database::{DatabaseError, HealthError, ReleaseCommand, health_commands};
pub use install::install_once;
pub use settings::{InvalidSetting, Settings, SettingsFile};
pub use trust::load_trust;
