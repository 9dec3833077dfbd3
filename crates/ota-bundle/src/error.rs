//! Everything that makes a bundle unacceptable, named after what was wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read the bundle at offset {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the bundle ends at offset {offset}, inside the {what} ({needed} more bytes expected)")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
    },
    #[error("not a quote-edge bundle (the first 8 bytes are not \"QEDGEBND\")")]
    BadMagic,
    #[error("unsupported bundle format {0} (this build reads format 1)")]
    UnsupportedFormat(u16),
    #[error("bundle header field `{field}` is {value}: {rule}")]
    Header {
        field: &'static str,
        value: u64,
        rule: &'static str,
    },
    #[error(
        "signed by {valid} of the trusted keys, {needed} needed \
         (signed by key ids: {bundle_keys}; trusted: {trusted_keys})"
    )]
    NotEnoughSignatures {
        valid: usize,
        needed: usize,
        bundle_keys: String,
        trusted_keys: String,
    },
    #[error("the manifest is not valid: {0}")]
    Manifest(String),
    #[error("two signatures by key {0}: each key signs once (a threshold counts distinct keys)")]
    DuplicateSignature(crate::KeyId),
    #[error("manifest field `{field}`: {reason}")]
    Field { field: String, reason: String },
    #[error(
        "the manifest is not in canonical form (it was not written by `ota pack`, or was altered)"
    )]
    NotCanonical,
    #[error("{extra} bytes follow the payload at offset {offset}")]
    TrailingData { offset: u64, extra: u64 },
    #[error("chunk {index} of {path} (bundle offset {offset}): {reason}")]
    Chunk {
        path: String,
        index: usize,
        offset: u64,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("release directory {path}: {reason}")]
    Release { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Moving a written bundle into place (fsync, rename, fsync of the directory).
    #[error(transparent)]
    Persist(#[from] durable::Error),
}

impl BundleError {
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        BundleError::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
