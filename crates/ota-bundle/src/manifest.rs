//! The signed manifest: what the bundle holds, down to each chunk's hash and frame size.
//! Parsed only after the signatures verified, then checked rule by rule (FORMAT.md).

use serde::{Deserialize, Serialize};

use crate::BundleError;

fn field(name: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError::field(name, reason)
}

/// Format 1: every frame stands alone.
pub const FORMAT_INDEPENDENT: u32 = 1;
/// Format 2: a frame whose file has a carried chunk before it is compressed with that chunk's
/// content as a zstd prefix (FORMAT.md). What `pack` writes.
pub const FORMAT_PREFIXED: u32 = 2;

/// Every chunk but a file's last is exactly this long.
pub const CHUNK_SIZE: u64 = 1 << 20;
/// Most files in one bundle.
pub const MAX_FILES: usize = 4096;
/// Largest file: 4 GiB.
pub const MAX_FILE_SIZE: u64 = 4 << 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub product: String,
    pub version: String,
    pub security_version: u64,
    pub issued_at: u64,
    pub hash: String,
    pub chunk_size: u64,
    pub base: Option<Base>,
    pub files: Vec<FileEntry>,
}

/// The release a delta bundle applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    pub version: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub digest: String,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub hash: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csize: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy: bool,
}

/// zstd's compressBound for one chunk, plus room for the frame header.
pub fn max_frame(size: u64) -> u64 {
    size + size / 128 + 1024
}

impl Manifest {
    /// The canonical encoding: the bytes that are signed.
    pub fn to_canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }

    /// Parses signed manifest bytes, refusing a non-canonical encoding and any broken rule.
    pub fn parse_canonical(bytes: &[u8]) -> Result<Manifest, BundleError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(e.to_string()))?;
        if manifest.to_canonical() != bytes {
            return Err(BundleError::NotCanonical);
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// The sum of all frame sizes: the payload length.
    /// The release's identity for deltas: BLAKE3 of its canonical file list (one line per
    /// file in manifest order: path, NUL, octal mode, NUL, size, NUL, whole-file digest). Two
    /// bundles of the same files have the same release digest, whatever their compression.
    pub fn release_digest(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        for f in &self.files {
            hasher
                .update(format!("{}\0{:o}\0{}\0{}\n", f.path, f.mode, f.size, f.digest).as_bytes());
        }
        hasher.finalize().to_hex().to_string()
    }

    /// Whether chunk `index` of `file` was compressed with the chunk before it as a prefix.
    pub fn prefixed(&self, file: &FileEntry, index: usize) -> bool {
        self.format == FORMAT_PREFIXED
            && index > 0
            && file
                .chunks
                .get(index - 1)
                .is_some_and(|c| c.csize.is_some())
    }

    pub fn payload_len(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| &f.chunks)
            .filter_map(|c| c.csize)
            .sum()
    }

    /// Every rule of FORMAT.md that does not need the device's state.
    pub fn validate(&self) -> Result<(), BundleError> {
        self.validate_fields()?;
        let mut payload: u64 = 0;
        for (i, file) in self.files.iter().enumerate() {
            let previous = i.checked_sub(1).map(|p| &self.files[p]);
            payload += self.validate_file(i, file, previous)?;
        }
        if payload > crate::header::MAX_PAYLOAD_LEN {
            return Err(field("files", "the payload would exceed 16 GiB"));
        }
        Ok(())
    }

    /// The manifest's own fields: format, product, version, hash, chunk size, base, file count.
    fn validate_fields(&self) -> Result<(), BundleError> {
        if self.format != FORMAT_INDEPENDENT && self.format != FORMAT_PREFIXED {
            return Err(field(
                "format",
                format!("is {}, must be 1 or 2", self.format),
            ));
        }
        if self.product.is_empty()
            || self.product.len() > 64
            || !self
                .product
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(field(
                "product",
                format!("{:?} must be 1-64 of [a-z0-9._-]", self.product),
            ));
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || !self.version.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(field(
                "version",
                format!("{:?} must be 1-64 printable ASCII characters", self.version),
            ));
        }
        if self.hash != "blake3" {
            return Err(field(
                "hash",
                format!("{:?} is not supported (blake3)", self.hash),
            ));
        }
        if self.chunk_size != CHUNK_SIZE {
            return Err(field(
                "chunk_size",
                format!("is {}, must be {CHUNK_SIZE}", self.chunk_size),
            ));
        }
        if let Some(base) = &self.base {
            check_hex("base.digest", &base.digest)?;
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(field(
                "files",
                format!(
                    "has {} entries, must have 1 to {MAX_FILES}",
                    self.files.len()
                ),
            ));
        }
        Ok(())
    }

    /// One file entry (sorted after `previous`); returns the bytes of its frames.
    fn validate_file(
        &self,
        i: usize,
        file: &FileEntry,
        previous: Option<&FileEntry>,
    ) -> Result<u64, BundleError> {
        let at = |key: &str| format!("files[{i}].{key} ({})", file.path);
        check_path(&file.path).map_err(|reason| field(format!("files[{i}].path"), reason))?;
        if previous.is_some_and(|p| p.path >= file.path) {
            return Err(field(
                format!("files[{i}].path"),
                "paths must be sorted and unique",
            ));
        }
        if file.mode & !0o755 != 0 {
            return Err(field(
                at("mode"),
                format!(
                    "{:o} has bits beyond 0755 (setuid, setgid, sticky or group/other write)",
                    file.mode
                ),
            ));
        }
        if file.size > MAX_FILE_SIZE {
            return Err(field(at("size"), "is larger than 4 GiB"));
        }
        check_hex(&at("digest"), &file.digest)?;
        let expected_chunks = file.size.div_ceil(CHUNK_SIZE);
        if file.chunks.len() as u64 != expected_chunks {
            return Err(field(
                at("chunks"),
                format!(
                    "has {} entries, a file of {} bytes needs {expected_chunks}",
                    file.chunks.len(),
                    file.size
                ),
            ));
        }
        let (mut total, mut payload) = (0u64, 0u64);
        for (n, chunk) in file.chunks.iter().enumerate() {
            payload += self.validate_chunk(i, file, n, chunk)?;
            total += chunk.size;
        }
        if total != file.size {
            return Err(field(
                at("size"),
                format!("is {}, its chunks add up to {total}", file.size),
            ));
        }
        Ok(payload)
    }

    /// One chunk of a file; returns the bytes of its frame (0 for a chunk copied from the base).
    fn validate_chunk(
        &self,
        i: usize,
        file: &FileEntry,
        n: usize,
        chunk: &Chunk,
    ) -> Result<u64, BundleError> {
        let at = |key: &str| format!("files[{i}].chunks[{n}].{key} ({})", file.path);
        check_hex(&at("hash"), &chunk.hash)?;
        let full = n + 1 < file.chunks.len();
        if chunk.size == 0 || chunk.size > CHUNK_SIZE || (full && chunk.size != CHUNK_SIZE) {
            return Err(field(
                at("size"),
                format!(
                    "is {}, must be {CHUNK_SIZE} (or 1 to {CHUNK_SIZE} for a file's last chunk)",
                    chunk.size
                ),
            ));
        }
        match (chunk.copy, chunk.csize) {
            (false, Some(csize)) if (1..=max_frame(chunk.size)).contains(&csize) => Ok(csize),
            (false, Some(csize)) => Err(field(
                at("csize"),
                format!("is {csize}, must be 1 to {}", max_frame(chunk.size)),
            )),
            (false, None) => Err(field(at("csize"), "is missing")),
            (true, None) if self.base.is_some() => Ok(0),
            (true, None) => Err(field(at("copy"), "appears in a full bundle (no `base`)")),
            (true, Some(_)) => Err(field(at("csize"), "a copied chunk has no frame")),
        }
    }
}

fn check_hex(field: &str, value: &str) -> Result<(), BundleError> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(BundleError::field(field, "must be 64 lowercase hex digits"))
    }
}

/// A relative path that stays inside the release: no absolute paths, no `..`, no `.`, no empty
/// components, no backslashes or NULs.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 255 {
        return Err(format!("{path:?} must be 1 to 255 bytes"));
    }
    if path.starts_with('/') {
        return Err(format!("{path:?} is absolute"));
    }
    if path.contains('\0') || path.contains('\\') {
        return Err(format!("{path:?} contains a NUL or a backslash"));
    }
    for part in path.split('/') {
        match part {
            "" => return Err(format!("{path:?} has an empty component")),
            "." | ".." => return Err(format!("{path:?} has a `{part}` component")),
            _ if part.chars().any(char::is_control) => {
                return Err(format!("{path:?} contains a control character"));
            }
            _ => {}
        }
    }
    Ok(())
}
