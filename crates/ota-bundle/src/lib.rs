//! The quote-edge update bundle (`ota/FORMAT.md`): header, canonical manifest, Ed25519
//! signatures, and the two directions: [`pack`] builds a bundle from a release directory,
//! [`Bundle::open`] verifies one and hands out its chunks only after each was authenticated.
//!
//! Architecture invariant: this crate never writes a slot and knows nothing of slots. Its reader
//! gives a caller's sink only bytes whose hash matched the signed manifest.

mod docs;
mod error;
mod header;
mod keys;
mod manifest;
mod pack;
mod read;
mod rollout;

pub use docs::{KeySet, MAX_DOC_LEN, Permit, Receipt, SignedDoc};
pub use error::BundleError;
pub use header::{HEADER_LEN, Header, MAGIC, MAX_MANIFEST_LEN, MAX_SIGNATURES, SIGNATURE_LEN};
pub use keys::{KeyId, PublicKey, SecretKey, TrustedKeys};
pub use manifest::{Base, CHUNK_SIZE, Chunk, FileEntry, MAX_FILES, Manifest};
pub use pack::{PackOptions, PackReport, add_signature, pack, pack_delta};
pub use read::{
    Bundle, Chunked, ChunksError, Position, SIGNING_DOMAIN, chunk_hash, declared_len_unverified,
    manifest_digest, read_manifest_and_digest_unverified, read_manifest_unverified, signed_message,
};
pub use rollout::{MAX_WAVES, PLAN_KIND, Plan, PlanError, Wave};

#[cfg(test)]
mod tests;
