//! The device's release slots and the state that says which one runs.
//!
//! Layout under the data directory (`<data-dir>/ota/`): `state.json` (this crate's state,
//! replaced atomically), `slots/a/` and `slots/b/` (release directories). The factory release
//! (the binaries next to the supervisor) is where a device starts.
//!
//! The order of an update follows Bottlerocket's signpost: mark the target slot `installing` and
//! persist; write and verify (the caller, with verified chunks only); mark it `ready`; switch as
//! a separate step, which starts a *trial*; then `commit` or `rollback` explicitly.
//!
//! Architecture invariant: this crate never parses bundle bytes; it only records what the agent
//! did. Every state change is a pure function on [`State`] (tested without a disk), persisted by
//! [`StateFile::save`] (temporary file, fsync, rename, fsync of the directory).

mod journal;
mod state;
mod store;
mod writer;

pub use journal::{Journal, Mark};
pub use state::{
    MAX_FAILED, Outcome, Refused, Release, SlotInfo, SlotName, SlotStatus, State, Trial,
};
pub use store::{Fs, KeptFs, RealFs, StateError, StateFile};
pub use writer::{SlotWriter, WriteError};
