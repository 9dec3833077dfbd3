//! ota-agent: the OTA agent the supervisor links (one process on the device). It verifies a
//! bundle, installs it in the inactive A/B slot, has the running release snapshot the
//! database, switches, asks the supervisor to roll the replicas over, tries the new release,
//! then commits, or rolls back with the database restored. `agent.md` has the diagram.
//!
//! The decisions are a pure state machine ([`machine`]: phases, events, actions, clock
//! injected); [`Agent`] is its I/O driver. The supervisor drives the agent with events in and
//! [`Step`]s out; it hands in a [`ReleaseCommand`] (how a release's program runs), so this
//! crate imports no process code.
//!
//! Architecture invariant: this crate never parses bundle bytes itself (`ota-bundle` does) and
//! never writes a slot but through `ota_slots::SlotWriter`.

pub mod admission;
mod agent;
mod database;
pub mod depot;
mod inbox;
mod install;
pub mod machine;
pub mod receipt;
mod release_check;
mod settings;
pub mod source;
mod trust;

pub use agent::{
    Agent, Installed, Layout, NotIdle, Notify, OtaEvent, Step, UpdateError, release_dir,
};
pub use database::{DatabaseError, HealthError, ReleaseCommand};
pub use install::install_once;
pub use settings::{InvalidSetting, Settings, SettingsFile};
pub use trust::load_trust;
