//! Opening a bundle: header, then signatures against the trusted keys, then the manifest's
//! rules, then (on request) the chunks, each decompressed within its declared size and hashed
//! before the caller sees a byte of it.

use std::io::Read;

use crate::BundleError;
use crate::header::{HEADER_LEN, Header, SIGNATURE_LEN};
use crate::keys::{KeyId, TrustedKeys};
use crate::manifest::{CHUNK_SIZE, FileEntry, Manifest};

/// Prefixed to the manifest in every signed message, so a signature over a bundle manifest can
/// never be mistaken for a signature over anything else.
pub const SIGNING_DOMAIN: &[u8] = b"quote-edge bundle v1\n";

/// The bytes an Ed25519 signature of a bundle covers.
pub fn signed_message(manifest: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_DOMAIN.len() + manifest.len());
    message.extend_from_slice(SIGNING_DOMAIN);
    message.extend_from_slice(manifest);
    message
}

/// The hash of one chunk's plain bytes as the manifest writes it (BLAKE3, hex), for an
/// installer that re-checks what it wrote before resuming.
pub fn chunk_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The bundle's identity: BLAKE3 of its signed manifest, which names every chunk's hash, so
/// two bundles with the same digest install the same bytes (re-signing does not change it).
pub fn manifest_digest(manifest: &[u8]) -> String {
    blake3::hash(manifest).to_hex().to_string()
}

/// A bundle whose signatures and manifest are verified; its payload is read on demand.
#[derive(Debug)]
pub struct Bundle<R> {
    pub header: Header,
    pub manifest: Manifest,
    /// The raw manifest bytes (what was signed).
    pub manifest_bytes: Vec<u8>,
    /// Ids of the trusted keys whose signatures verified.
    pub signed_by: Vec<KeyId>,
    reader: R,
    /// Where the reader is.
    offset: u64,
    /// Where the payload starts (the length of the head).
    payload_start: u64,
}

/// Reads exactly `buf.len()` bytes, naming what was being read when the input ends.
fn read_exact(
    reader: &mut impl Read,
    buf: &mut [u8],
    offset: &mut u64,
    what: &'static str,
) -> Result<(), BundleError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(BundleError::Truncated {
                    what,
                    offset: *offset + filled as u64,
                    needed: (buf.len() - filled) as u64,
                });
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(BundleError::Read {
                    offset: *offset + filled as u64,
                    source,
                });
            }
        }
    }
    *offset += buf.len() as u64;
    Ok(())
}

/// A signature as stored: the signer's key id and the Ed25519 signature.
pub(crate) type Signature = (KeyId, [u8; 64]);

/// Everything before the payload, not yet trusted: header, manifest bytes, signatures, and the
/// offset reached.
pub(crate) struct Unverified {
    pub header: Header,
    pub manifest: Vec<u8>,
    pub signatures: Vec<Signature>,
    pub offset: u64,
}

/// The header, the manifest bytes and the signatures, before anything is trusted.
pub(crate) fn read_unverified(reader: &mut impl Read) -> Result<Unverified, BundleError> {
    let mut offset = 0u64;
    let mut head = [0u8; HEADER_LEN];
    read_exact(reader, &mut head, &mut offset, "header")?;
    let header = Header::parse(&head)?;
    // Bounded by the header check (at most 1 MiB).
    let mut manifest = vec![0u8; header.manifest_len as usize];
    read_exact(reader, &mut manifest, &mut offset, "manifest")?;
    let mut signatures = Vec::with_capacity(header.signature_count.into());
    for _ in 0..header.signature_count {
        let mut entry = [0u8; SIGNATURE_LEN];
        read_exact(reader, &mut entry, &mut offset, "signatures")?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&entry[..8]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&entry[8..]);
        if signatures.iter().any(|(seen, _)| *seen == KeyId(id)) {
            return Err(BundleError::DuplicateSignature(KeyId(id)));
        }
        signatures.push((KeyId(id), signature));
    }
    Ok(Unverified {
        header,
        manifest,
        signatures,
        offset,
    })
}

impl<R: Read> Bundle<R> {
    /// Reads and verifies everything before the payload. Nothing of the manifest is looked at
    /// until enough trusted signatures verified.
    pub fn open(mut reader: R, trusted: &TrustedKeys) -> Result<Bundle<R>, BundleError> {
        let Unverified {
            header,
            manifest: manifest_bytes,
            signatures,
            offset,
        } = read_unverified(&mut reader)?;
        let message = signed_message(&manifest_bytes);
        let mut signed_by: Vec<KeyId> = Vec::new();
        for (id, signature) in &signatures {
            if let Some(key) = trusted.get(id)
                && key.verify(&message, signature)
            {
                signed_by.push(*id);
            }
        }
        if signed_by.len() < trusted.threshold() {
            let list = |ids: &mut dyn Iterator<Item = &KeyId>| {
                ids.map(KeyId::to_string).collect::<Vec<_>>().join(", ")
            };
            return Err(BundleError::NotEnoughSignatures {
                valid: signed_by.len(),
                needed: trusted.threshold(),
                bundle_keys: list(&mut signatures.iter().map(|(id, _)| id)),
                trusted_keys: list(&mut trusted.ids()),
            });
        }
        let manifest = Manifest::parse_canonical(&manifest_bytes)?;
        if manifest.payload_len() != header.payload_len {
            return Err(BundleError::Header {
                field: "payload_len",
                value: header.payload_len,
                rule: "must equal the sum of the manifest's frame sizes",
            });
        }
        Ok(Bundle {
            header,
            manifest,
            manifest_bytes,
            signed_by,
            reader,
            offset,
            payload_start: offset,
        })
    }

    /// Walks the payload in manifest order. For each chunk, `sink` gets the file, the chunk's
    /// index and its bytes, only after they matched the signed hash; a copied (delta) chunk is
    /// handed to `sink` with no bytes, to be fetched from the base by hash. Reading stops at the
    /// first error, and the input must end exactly where the payload does.
    pub fn chunks<E>(
        self,
        mut sink: impl FnMut(&FileEntry, usize, Chunked<'_>) -> Result<(), E>,
    ) -> Result<(), ChunksError<E>> {
        let start = self.start();
        self.chunks_from(start, &[], |file, index, chunk, _| sink(file, index, chunk))
    }

    /// The length of the whole bundle file the signed manifest describes: header, manifest,
    /// signatures and payload. A copy of another length is damaged or incomplete (checked before
    /// anything is written; FORMAT.md).
    pub fn file_len(&self) -> u64 {
        self.payload_start.saturating_add(self.header.payload_len)
    }

    /// The same bundle, read on from `reader`, which yields its bytes from `offset` on: a new
    /// connection that asked for that range after the first one (which read the verified head)
    /// was dropped. The walk that follows must start at `offset` or after it; nothing between
    /// the head and `offset` is read.
    pub fn continue_at<R2: Read>(self, reader: R2, offset: u64) -> Result<Bundle<R2>, BundleError> {
        if offset < self.payload_start || offset > self.file_len() {
            return Err(BundleError::field(
                "resume position",
                format!(
                    "offset {offset} is not between the payload's start {} and the end {}",
                    self.payload_start,
                    self.file_len()
                ),
            ));
        }
        Ok(Bundle {
            header: self.header,
            manifest: self.manifest,
            manifest_bytes: self.manifest_bytes,
            signed_by: self.signed_by,
            reader,
            offset,
            payload_start: self.payload_start,
        })
    }

    /// The position of the first chunk.
    pub fn start(&self) -> Position {
        Position {
            file: 0,
            chunk: 0,
            offset: self.payload_start,
        }
    }

    /// As [`Bundle::chunks`], from `from` (a position an earlier walk handed to its sink, to
    /// resume an interrupted install): the payload before it is read past, not decompressed.
    /// The sink also gets the position after each chunk. A position that is not the start of a
    /// chunk of this manifest is refused. When the chunk at `from` was compressed with the one
    /// before it ([`Manifest::prefixed`]), `prefix` must be that chunk's content (the caller
    /// read it back from what it wrote; it is checked against the signed hash); otherwise it
    /// is ignored.
    ///
    /// One piece: the loop keeps the running position, the journal's prefix and the bounded
    /// reads in one place, so that no path reads a frame without its length checked first.
    pub fn chunks_from<E>(
        mut self,
        from: Position,
        prefix: &[u8],
        mut sink: impl FnMut(&FileEntry, usize, Chunked<'_>, Position) -> Result<(), E>,
    ) -> Result<(), ChunksError<E>> {
        self.seek_to(from).map_err(ChunksError::Bundle)?;
        // The walk itself stays one piece: the frame, plain and prefix buffers thread through
        // every chunk (read the frame, decompress with the previous chunk, hash, hand it on).
        let mut frame = Vec::new();
        let mut plain = vec![0u8; CHUNK_SIZE as usize];
        // The content of the previous carried chunk of the current file (the next frame's
        // prefix, format 2); empty when there is none.
        let mut prev: Vec<u8> = Vec::with_capacity(CHUNK_SIZE as usize);
        if let Some(file) = self.manifest.files.get(from.file)
            && from.chunk < file.chunks.len()
            && self.manifest.prefixed(file, from.chunk)
        {
            let before = &file.chunks[from.chunk - 1];
            if prefix.len() as u64 != before.size || chunk_hash(prefix) != before.hash {
                return Err(ChunksError::Bundle(BundleError::field(
                    "resume prefix",
                    format!(
                        "is not chunk {} of {}, which chunk {} was compressed with",
                        from.chunk - 1,
                        file.path,
                        from.chunk
                    ),
                )));
            }
            prev.extend_from_slice(prefix);
        }
        let files = self.manifest.files.len();
        for (f, file) in self.manifest.files.iter().enumerate().skip(from.file) {
            let first = if f == from.file { from.chunk } else { 0 };
            if f != from.file {
                prev.clear();
            }
            for (index, chunk) in file.chunks.iter().enumerate().skip(first) {
                let next = |offset: u64| {
                    if index + 1 < file.chunks.len() || f + 1 == files {
                        Position {
                            file: f,
                            chunk: index + 1,
                            offset,
                        }
                    } else {
                        Position {
                            file: f + 1,
                            chunk: 0,
                            offset,
                        }
                    }
                };
                let Some(csize) = chunk.csize else {
                    prev.clear();
                    sink(
                        file,
                        index,
                        Chunked::Copy { hash: &chunk.hash },
                        next(self.offset),
                    )
                    .map_err(ChunksError::Sink)?;
                    continue;
                };
                let at = self.offset;
                let fail = |reason: String| {
                    ChunksError::Bundle(BundleError::Chunk {
                        path: file.path.clone(),
                        index,
                        offset: at,
                        reason,
                    })
                };
                // Bounded by the manifest check (at most chunk size + zstd's overhead).
                frame.resize(csize as usize, 0);
                read_exact(&mut self.reader, &mut frame, &mut self.offset, "payload")
                    .map_err(ChunksError::Bundle)?;
                let size = chunk.size as usize;
                let with = if self.manifest.prefixed(file, index) {
                    &prev[..]
                } else {
                    &[][..]
                };
                let produced = decompress_chunk(with, &frame, &mut plain[..size]).map_err(|e| {
                    fail(format!(
                        "does not decompress within its declared {size} bytes: {e}"
                    ))
                })?;
                if produced != size {
                    return Err(fail(format!(
                        "decompresses to {produced} bytes, {size} declared"
                    )));
                }
                let hash = blake3::hash(&plain[..size]);
                if hash.to_hex().as_str() != chunk.hash {
                    return Err(fail(
                        "its content does not match the signed hash".to_owned(),
                    ));
                }
                sink(
                    file,
                    index,
                    Chunked::Data(&plain[..size]),
                    next(self.offset),
                )
                .map_err(ChunksError::Sink)?;
                prev.clear();
                prev.extend_from_slice(&plain[..size]);
            }
        }
        self.expect_end().map_err(ChunksError::Bundle)
    }

    /// Checks that `from` is a chunk boundary of this bundle (a position a walk handed out)
    /// and reads past the payload before it.
    fn seek_to(&mut self, from: Position) -> Result<(), BundleError> {
        let mut at = self.payload_start;
        let mut valid = false;
        'find: for (f, file) in self.manifest.files.iter().enumerate() {
            for c in 0..=file.chunks.len() {
                if (f, c) == (from.file, from.chunk) {
                    valid = at == from.offset;
                    break 'find;
                }
                if let Some(chunk) = file.chunks.get(c) {
                    at += chunk.csize.unwrap_or(0);
                }
            }
        }
        if from.file == self.manifest.files.len() && from.chunk == 0 {
            valid = at == from.offset;
        }
        if !valid {
            return Err(BundleError::field(
                "resume position",
                format!(
                    "file {} chunk {} at offset {} is not a chunk of this bundle",
                    from.file, from.chunk, from.offset
                ),
            ));
        }
        if from.offset < self.offset {
            return Err(BundleError::field(
                "resume position",
                format!(
                    "offset {} is behind the reader, at {}",
                    from.offset, self.offset
                ),
            ));
        }
        let skip = from.offset - self.offset;
        let skipped = std::io::copy(&mut (&mut self.reader).take(skip), &mut std::io::sink())
            .map_err(|source| BundleError::Read {
                offset: self.offset,
                source,
            })?;
        if skipped != skip {
            return Err(BundleError::Truncated {
                what: "payload",
                offset: self.offset + skipped,
                needed: skip - skipped,
            });
        }
        self.offset = from.offset;
        Ok(())
    }

    /// Nothing may follow the last frame.
    fn expect_end(&mut self) -> Result<(), BundleError> {
        let mut extra = [0u8; 1];
        match self.reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(BundleError::TrailingData {
                offset: self.offset,
                extra: 1,
            }),
            Err(source) => Err(BundleError::Read {
                offset: self.offset,
                source,
            }),
        }
    }
}

/// Decompresses one frame into `out` (its declared size: nothing can grow past it), with
/// `prefix` (empty for none) as the raw-content prefix it was compressed with.
pub(crate) fn decompress_chunk(
    prefix: &[u8],
    frame: &[u8],
    out: &mut [u8],
) -> Result<usize, String> {
    use zstd::zstd_safe::{DCtx, get_error_name};
    let mut dctx = DCtx::try_create().ok_or("cannot allocate a zstd context")?;
    if !prefix.is_empty() {
        dctx.ref_prefix(prefix).map_err(get_error_name)?;
    }
    dctx.decompress(out, frame)
        .map_err(|code| get_error_name(code).to_owned())
}

/// A place in the payload: the next chunk (`chunk` of `file`, in manifest order) and the
/// bundle offset of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub file: usize,
    pub chunk: usize,
    pub offset: u64,
}

/// One chunk as handed to a sink.
#[derive(Debug, Clone, Copy)]
pub enum Chunked<'a> {
    /// Verified bytes.
    Data(&'a [u8]),
    /// A delta chunk: copy the chunk with this hash from the base release.
    Copy { hash: &'a str },
}

/// Why walking the chunks stopped: the bundle, or the caller's sink.
#[derive(Debug, thiserror::Error)]
pub enum ChunksError<E> {
    #[error(transparent)]
    Bundle(BundleError),
    #[error("writing a verified chunk failed: {0}")]
    Sink(E),
}

/// The manifest and the signers' key ids of a bundle, read *without* checking signatures (for
/// `ota inspect`). The manifest's rules are still checked: a malformed one is refused.
pub fn read_manifest_unverified(reader: impl Read) -> Result<(Manifest, Vec<KeyId>), BundleError> {
    let (manifest, signers, _) = read_manifest_and_digest_unverified(reader)?;
    Ok((manifest, signers))
}

/// The length of the whole bundle file as its (unverified) header and manifest declare it: an
/// inbox scan does not offer a file shorter than that, which may still be being copied.
pub fn declared_len_unverified(mut reader: impl Read) -> Result<u64, BundleError> {
    let unverified = read_unverified(&mut reader)?;
    Ok(unverified
        .offset
        .saturating_add(unverified.header.payload_len))
}

/// As [`read_manifest_unverified`], with the [`manifest_digest`] (for an inbox scan that must
/// not re-offer a bundle that failed or is already installed).
pub fn read_manifest_and_digest_unverified(
    mut reader: impl Read,
) -> Result<(Manifest, Vec<KeyId>, String), BundleError> {
    let unverified = read_unverified(&mut reader)?;
    let manifest = Manifest::parse_canonical(&unverified.manifest)?;
    Ok((
        manifest,
        unverified.signatures.iter().map(|(id, _)| *id).collect(),
        manifest_digest(&unverified.manifest),
    ))
}
