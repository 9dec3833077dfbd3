//! The fleet depot's contract (`ota/FORMAT.md`, "The depot protocol"): what `ota-depot serve`,
//! its operator commands and a device's depot source say to each other.
//!
//! - [`wire`]: the JSON bodies (poll, offer, report, status, publish), serde types only;
//! - [`auth`]: the signed device request (the message a device key signs, and its headers);
//! - [`client`] (feature `client`): a blocking client for both sides, with every read bounded.
//!
//! Architecture invariant: no I/O outside `client`; fields are only added within one
//! [`PROTOCOL_VERSION`].

pub mod auth;
#[cfg(feature = "client")]
pub mod client;
pub mod wire;

/// The depot protocol's version, in every path (`/api/v1/...`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Exit codes of `ota-depot`: the same table as `edge-supervisor`'s and `ota`'s (a refusal is
/// 3, an unreachable peer 4, a configuration error 78), so scripts read them one way.
pub use edge_proto::exit;
