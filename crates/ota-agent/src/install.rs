//! The install glue: a verified bundle's chunks into the inactive slot's `SlotWriter`, with the
//! admission checks before the slot is touched (product, anti-rollback floor and replay,
//! downgrade permits, delta base, free space), the install journal, and resuming an
//! interrupted install from its last mark.
//!
//! Architecture invariant: nothing reaches the slot before the bundle's signatures verified
//! and the admission checks passed, and then only chunks `ota-bundle` verified.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ota_bundle::{Bundle, Chunked, ChunksError, TrustedKeys};
use ota_slots::{Journal, KeptFs, Mark, RealFs, Release, SlotName, SlotWriter, State, StateFile};

use crate::admission::{self, Decision, Device};
use crate::depot::{Download, DownloadStats};
use crate::source::Offer;

/// What a bundle is read from: a local file, or a depot's download.
type Input = Box<dyn Read + Send>;
use crate::agent::{Installed, Layout, UpdateError};
use crate::trust::{load_trust, read_doc};

/// Installs `bundle` into the inactive slot under `data_dir` exactly as the agent does
/// (admission checks, verification, the slot writer, the journal, the slot marked ready and
/// the state saved), without the phases around it (no snapshot, no switch): the data path
/// alone, for the benchmark and the install tests (`tests/src/bin/ota-install.rs`).
pub fn install_once(
    data_dir: &Path,
    trusted_keys: &Path,
    product: &str,
    bundle: &Path,
) -> Result<Installed, UpdateError> {
    let layout = Layout::new(data_dir);
    let (file, state) = layout.open_state()?;
    let job = Install {
        bundle: Offer::File(bundle.to_owned()),
        trusted_keys: trusted_keys.to_owned(),
        product: product.to_owned(),
        max_security_step: crate::settings::DEFAULT_MAX_SECURITY_STEP,
        layout,
        file,
        state,
        progress: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
        downloads: Arc::default(),
    };
    job.run().1
}

/// One install, run on a blocking task. Owns a copy of the state while it runs.
pub(crate) struct Install {
    pub(crate) bundle: Offer,
    pub(crate) trusted_keys: PathBuf,
    pub(crate) product: String,
    /// `ota.max_security_step`.
    pub(crate) max_security_step: u64,
    pub(crate) layout: Layout,
    pub(crate) file: StateFile,
    pub(crate) state: State,
    pub(crate) progress: Arc<(AtomicU64, AtomicU64)>,
    /// What a depot's download cost (unused for a file).
    pub(crate) downloads: Arc<DownloadStats>,
}

/// What the admission checks let through.
struct Admission {
    /// Where a delta's copied chunks are read from in the running release.
    copies: HashMap<String, (PathBuf, u64, u64)>,
    /// The inactive slot the release goes to.
    target: SlotName,
    /// Bytes of the release.
    needed: u64,
    /// The downgrade permit that let it in, if it needed one.
    permit: Option<String>,
}

/// Why writing the slot stopped.
enum WriteFailure {
    /// This copy of the bundle is damaged (a chunk that does not match its signed hash): the
    /// slot is emptied and the file not offered again, but the release is not blamed: another
    /// copy of it may be installed.
    BadBundle(String),
    /// Anything else (the stick pulled out, a write error): the install is abandoned and the
    /// bundle offered again.
    Interrupted(String),
}

impl Install {
    pub(crate) fn run(self) -> (State, Result<Installed, UpdateError>) {
        let mut state = self.state.clone();
        let result = self.install(&mut state);
        (state, result)
    }

    fn install(&self, state: &mut State) -> Result<Installed, UpdateError> {
        let started = Instant::now();
        let (bundle, trusted) = self.open_verified()?;
        let manifest = &bundle.manifest;
        let digest = ota_bundle::manifest_digest(&bundle.manifest_bytes);
        let admitted = self.admit(manifest, &digest, state, &trusted)?;
        let slot = admitted.target;
        self.progress.1.store(admitted.needed, Ordering::Relaxed);

        let mut journal = Journal::new(&self.layout.dir);
        let resume = journal
            .read()
            .filter(|m| {
                m.digest == digest
                    && m.slot == slot
                    && state.slot(slot).status == ota_slots::SlotStatus::Installing
                    && state.slot(slot).bundle_digest.as_deref() == Some(digest.as_str())
            })
            .and_then(|mark| self.check_written(manifest, &mark).map(|kept| (mark, kept)));
        if resume.is_none() {
            let _ = journal.clear();
            let _ = std::fs::remove_file(self.layout.manifest(slot));
            let _ = std::fs::remove_file(self.layout.head(slot));
            let (mut next, _) =
                state.begin_install(&digest, &manifest.version, manifest.security_version)?;
            if let Some(permit) = &admitted.permit {
                next = next.hold_permit(slot, permit)?;
            }
            *state = self.file.save(&mut RealFs, &next)?;
        }
        let resumed = resume.as_ref().map_or(0, |(_, kept)| kept.total);
        self.progress.0.store(resumed, Ordering::Relaxed);
        let (version, issued_at) = (manifest.version.clone(), manifest.issued_at);
        let manifest_bytes = bundle.manifest_bytes.clone();
        let head_len = bundle.start().offset;
        let written = self
            .write_slot(
                bundle,
                &digest,
                slot,
                &admitted.copies,
                &mut journal,
                resume,
            )
            .and_then(|written| {
                durable::replace(&mut KeptFs, &self.layout.manifest(slot), &manifest_bytes)
                    .map(|()| written)
                    .map_err(|e| {
                        WriteFailure::Interrupted(format!("cannot keep the manifest: {e}"))
                    })
            })
            .and_then(|written| {
                self.keep_head(slot, head_len)
                    .map(|()| written)
                    .map_err(|e| {
                        WriteFailure::Interrupted(format!("cannot keep the signed head: {e}"))
                    })
            });
        // The journal is cleared only once the state no longer says `installing`: a cut in
        // between leaves a mark that the next start ignores, never a slot without its mark.
        match written {
            Ok((bytes, unchanged)) => {
                *state = self.file.save(&mut RealFs, &state.finish_install(slot)?)?;
                let _ = journal.clear();
                if let Offer::Depot(offer) = &self.bundle {
                    tracing::info!(
                        version = %offer.version,
                        received = self.downloads.received.load(Ordering::Relaxed),
                        bundle_size = offer.size,
                        requests = self.downloads.requests.load(Ordering::Relaxed),
                        "bundle downloaded"
                    );
                }
                Ok(Installed {
                    slot,
                    resumed,
                    version,
                    issued_at,
                    bundle: self.bundle.clone(),
                    bytes,
                    unchanged,
                    took: started.elapsed(),
                })
            }
            Err(failure) => {
                let (next, error) = match failure {
                    WriteFailure::BadBundle(reason) => {
                        let error = UpdateError::DamagedCopy {
                            slot: slot.as_str(),
                            reason,
                        };
                        (state.fail_install(slot, &error.to_string())?, error)
                    }
                    WriteFailure::Interrupted(reason) => {
                        let error = UpdateError::Install {
                            slot: slot.as_str(),
                            reason,
                        };
                        (state.abandon_install(slot)?, error)
                    }
                };
                *state = self.file.save(&mut RealFs, &next)?;
                let _ = journal.clear();
                let _ = std::fs::remove_dir_all(self.layout.slot(slot));
                Err(error)
            }
        }
    }

    /// Keeps the bundle's first `len` bytes (header, manifest, signatures) beside the slot: what
    /// the slot is checked against before each run (`release_check`).
    fn keep_head(&self, slot: SlotName, len: u64) -> std::io::Result<()> {
        let mut head = Vec::new();
        match &self.bundle {
            Offer::File(path) => std::fs::File::open(path)?
                .take(len)
                .read_to_end(&mut head)?,
            // A few KiB asked for again: cheaper than holding the first connection's bytes.
            Offer::Depot(offer) => {
                Download::range(offer, 0..len, self.device_id(), self.downloads.clone())
                    .read_to_end(&mut head)?
            }
        };
        if head.len() as u64 != len {
            return Err(std::io::Error::other("the bundle is shorter than its head"));
        }
        durable::replace(&mut KeptFs, &self.layout.head(slot), &head).map_err(std::io::Error::other)
    }

    /// The bundle, its signatures verified against the keys trusted now.
    fn open_verified(&self) -> Result<(Bundle<Input>, TrustedKeys), UpdateError> {
        let (trusted, _) = load_trust(&self.trusted_keys, &self.layout.dir, &self.product)?;
        let name = self.bundle.as_path();
        let open = |source| UpdateError::Open {
            path: name.clone(),
            source,
        };
        let (input, len): (Input, u64) = match &self.bundle {
            Offer::File(path) => {
                // Never through a link, never blocking on a FIFO: a stick is a stranger's
                // file system.
                let meta = std::fs::symlink_metadata(path).map_err(open)?;
                if !meta.is_file() {
                    return Err(UpdateError::NotAFile(path.clone()));
                }
                let file = crate::inbox::open_untrusted(path).map_err(open)?;
                let len = file.metadata().map_err(open)?.len();
                (Box::new(BufReader::with_capacity(1 << 20, file)), len)
            }
            // Read as it downloads: the head first (verified before anything else is
            // read), then the payload straight into the slot.
            Offer::Depot(offer) => (
                Box::new(BufReader::with_capacity(
                    1 << 16,
                    Download::new(offer, 0, self.device_id(), self.downloads.clone()),
                )),
                offer.size,
            ),
        };
        let bundle = Bundle::open(input, &trusted).map_err(|source| UpdateError::Bundle {
            path: name.clone(),
            source,
        })?;
        if len != bundle.file_len() {
            return Err(UpdateError::Incomplete {
                path: name,
                len,
                expected: bundle.file_len(),
            });
        }
        Ok((bundle, trusted))
    }

    /// This device's id, named on its downloads (for the depot's counts only).
    fn device_id(&self) -> Option<String> {
        crate::receipt::device_id(&self.layout.dir.join("device.key")).ok()
    }

    /// The admission checks ([`admission::admit`]) on what this device knows, before the slot
    /// is touched; for a delta, where its copied chunks are in the running release.
    fn admit(
        &self,
        manifest: &ota_bundle::Manifest,
        digest: &str,
        state: &State,
        trusted: &TrustedKeys,
    ) -> Result<Admission, UpdateError> {
        let kept = match state.active {
            Release::Slot(active) if manifest.base.is_some() => Some(self.kept_manifest(active)),
            _ => None,
        };
        let slots_dir = self.layout.dir.join("slots");
        std::fs::create_dir_all(&slots_dir).map_err(|e| UpdateError::Install {
            slot: "-",
            reason: format!("cannot create {}: {e}", slots_dir.display()),
        })?;
        // The inactive slot's old content is freed before writing, so it counts as free.
        let reclaimable = dir_size(&self.layout.slot(state.inactive()));
        let permit = admission::needs_permit(manifest, state)
            .then(|| self.permit(trusted, digest, state))
            .flatten();
        let device = Device {
            product: &self.product,
            max_security_step: self.max_security_step,
            state,
            id: crate::receipt::device_id(&self.layout.dir.join("device.key"))
                .unwrap_or_else(|e| e.to_string()),
            permitted: permit.is_some(),
            running_digest: match &kept {
                Some(Ok(kept)) => Ok(kept.release_digest()),
                Some(Err(why)) => Err(*why),
                None => Err("no kept manifest"),
            },
            free: free_bytes(&slots_dir)?.saturating_add(reclaimable),
            slots_dir,
        };
        let admitted = match admission::admit(manifest, digest, &device) {
            Decision::Admit(admitted) => admitted,
            Decision::Refuse(refused) => return Err(refused),
        };
        let copies = match (state.active, kept) {
            (Release::Slot(active), Some(Ok(kept))) => copy_index(&self.layout.slot(active), &kept),
            _ => HashMap::new(),
        };
        Ok(Admission {
            copies,
            target: admitted.target,
            needed: admitted.needed,
            permit,
        })
    }

    /// The verified manifest kept beside the running release's slot, or why there is none.
    fn kept_manifest(&self, slot: SlotName) -> Result<ota_bundle::Manifest, &'static str> {
        let bytes =
            std::fs::read(self.layout.manifest(slot)).map_err(|_| "whose manifest is not kept")?;
        ota_bundle::Manifest::parse_canonical(&bytes)
            .map_err(|_| "whose kept manifest is unreadable")
    }

    /// Writes the release into `slot` from verified chunks (from the resume point when there
    /// is one), with a journal mark every `JOURNAL_EVERY` bytes; returns the bytes written and
    /// the bytes found unchanged.
    fn write_slot(
        &self,
        bundle: Bundle<Input>,
        digest: &str,
        slot: SlotName,
        copies: &HashMap<String, (PathBuf, u64, u64)>,
        journal: &mut Journal,
        resume: Option<(Mark, Kept)>,
    ) -> Result<(u64, u64), WriteFailure> {
        let files: Vec<(String, u32, usize)> = bundle
            .manifest
            .files
            .iter()
            .map(|f| (f.path.clone(), f.mode, f.chunks.len()))
            .collect();
        let local = |e: ota_slots::WriteError| WriteFailure::Interrupted(e.to_string());
        let (mut writer, from, prefix) = self.start_writer(&files, slot, resume).map_err(local)?;
        let (bundle, from) = match (from, &self.bundle) {
            // A resumed download asks for the rest only: the bytes before the mark are in
            // the slot already (and were just re-hashed).
            (Some(from), Offer::Depot(offer)) if from.offset > bundle.start().offset => {
                let rest: Input = Box::new(BufReader::with_capacity(
                    1 << 16,
                    Download::new(offer, from.offset, self.device_id(), self.downloads.clone()),
                ));
                let bundle = bundle
                    .continue_at(rest, from.offset)
                    .map_err(|e| WriteFailure::BadBundle(e.to_string()))?;
                (bundle, from)
            }
            (from, _) => {
                let start = bundle.start();
                (bundle, from.unwrap_or(start))
            }
        };
        let mut unsynced = 0u64;
        bundle
            .chunks_from(from, &prefix, |file, index, chunk, next| {
                let copied;
                let bytes = match chunk {
                    Chunked::Data(bytes) => bytes,
                    Chunked::Copy { hash } => {
                        copied = copy_chunk(copies, hash)?;
                        &copied[..]
                    }
                };
                writer.chunk(&file.path, file.mode, index, bytes)?;
                if index + 1 == file.chunks.len() {
                    // Length, mode and fsync now: a mark at the next file's start must
                    // cover a finished file, since a resume never comes back to it.
                    writer.finish_file()?;
                }
                self.progress
                    .0
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                unsynced += bytes.len() as u64;
                // No mark after the last chunk: nothing would be left to resume.
                let at_end = next.file + 1 == files.len() && next.chunk == files[next.file].2;
                if unsynced >= JOURNAL_EVERY && !at_end {
                    writer.sync()?;
                    journal
                        .record(&Mark {
                            digest: digest.to_owned(),
                            slot,
                            file: next.file as u32,
                            chunk: next.chunk as u32,
                            offset: next.offset,
                        })
                        .map_err(|source| ota_slots::WriteError::Io {
                            path: self.layout.dir.join("install.journal"),
                            source,
                        })?;
                    unsynced = 0;
                }
                Ok(())
            })
            .map_err(|e: ChunksError<ota_slots::WriteError>| match e {
                // A failed read of the bundle (the stick pulled out) is not its fault.
                ChunksError::Bundle(ota_bundle::BundleError::Read { .. }) => {
                    WriteFailure::Interrupted(e.to_string())
                }
                ChunksError::Bundle(_) => WriteFailure::BadBundle(e.to_string()),
                ChunksError::Sink(_) => WriteFailure::Interrupted(e.to_string()),
            })?;
        for (path, mode, chunks) in &files {
            if *chunks == 0 {
                writer.empty_file(path, *mode).map_err(local)?;
            }
        }
        let unchanged = writer.unchanged();
        writer
            .finish()
            .map(|bytes| (bytes, unchanged))
            .map_err(local)
    }

    /// The slot writer, and where in the bundle to start: after the journal's mark with the
    /// chunk before it (the next frame's zstd prefix), or at the start (`None`) over whatever
    /// the slot holds.
    fn start_writer(
        &self,
        files: &[(String, u32, usize)],
        slot: SlotName,
        resume: Option<(Mark, Kept)>,
    ) -> Result<(SlotWriter, Option<ota_bundle::Position>, Vec<u8>), ota_slots::WriteError> {
        let slot_dir = self.layout.slot(slot);
        let started = match resume {
            Some((mark, kept)) => {
                let (path, mode, _) = &files[mark.file as usize];
                let later: Vec<&str> = files[mark.file as usize + 1..]
                    .iter()
                    .map(|(p, _, _)| p.as_str())
                    .collect();
                tracing::info!(path = %path, chunk = mark.chunk, resumed = kept.total, "resuming an interrupted install");
                let writer = SlotWriter::resume(
                    &slot_dir,
                    path,
                    *mode,
                    mark.chunk as usize,
                    kept.in_file,
                    &later,
                )?;
                let from = ota_bundle::Position {
                    file: mark.file as usize,
                    chunk: mark.chunk as usize,
                    offset: mark.offset,
                };
                // The chunk before the mark, as re-hashed by `check_written`: the next
                // frame may be compressed with it (the reader checks it once more).
                (writer, Some(from), kept.last_chunk)
            }
            None => {
                let paths: Vec<&str> = files.iter().map(|(p, _, _)| p.as_str()).collect();
                (SlotWriter::update(&slot_dir, &paths)?, None, Vec::new())
            }
        };
        Ok(started)
    }

    /// A downgrade permit (`*.permit` beside the bundle) for this device and this bundle,
    /// signed by a threshold of the trusted keys, and not used before: its document id.
    fn permit(&self, trusted: &TrustedKeys, digest: &str, state: &State) -> Option<String> {
        let device = crate::receipt::device_id(&self.layout.dir.join("device.key")).ok()?;
        // Beside a file only: a depot offers no downgrades (a permit is a stick's business).
        let dir = self.bundle.path()?.parent().unwrap_or(Path::new("."));
        let entries = std::fs::read_dir(dir).ok()?;
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "permit") {
                continue;
            }
            let Some(doc) = read_doc(&path, "permit") else {
                continue;
            };
            if state.used_permits.contains(&doc.id()) {
                tracing::info!(permit = %path.display(), "permit already used: a permit lowers a device once");
                continue;
            }
            match ota_bundle::Permit::verify(&doc, trusted, &self.product, &device, digest) {
                Ok(permit) => {
                    tracing::warn!(permit = %path.display(), version = %permit.version, "downgrade permitted");
                    return Some(doc.id());
                }
                Err(error) => {
                    tracing::info!(permit = %path.display(), %error, "permit not usable")
                }
            }
        }
        None
    }

    /// Re-hashes what an interrupted install wrote before `mark`: every file before it whole,
    /// and the chunks of its file before its chunk. What is kept, or None (start over).
    fn check_written(&self, manifest: &ota_bundle::Manifest, mark: &Mark) -> Option<Kept> {
        use std::io::Read;
        if !mark_within(manifest, mark) {
            tracing::warn!(
                file = mark.file,
                chunk = mark.chunk,
                "the install journal names a chunk this bundle does not have; starting over"
            );
            return None;
        }
        let dir = self.layout.slot(mark.slot);
        let mut kept = Kept::default();
        let mut buf = vec![0u8; ota_bundle::CHUNK_SIZE as usize];
        for (f, entry) in manifest
            .files
            .iter()
            .enumerate()
            .take(mark.file as usize + 1)
        {
            let chunks = if f == mark.file as usize {
                mark.chunk as usize
            } else {
                entry.chunks.len()
            };
            if chunks == 0 {
                continue;
            }
            let Ok(mut file) = std::fs::File::open(dir.join(&entry.path)) else {
                tracing::warn!(path = %entry.path, "a file the interrupted install wrote is missing; starting over");
                return None;
            };
            // A file before the mark's was finished (cut to length) before the mark was made.
            if f < mark.file as usize && file.metadata().ok()?.len() != entry.size {
                tracing::warn!(path = %entry.path, "the interrupted install left a file of the wrong length; starting over");
                return None;
            }
            for chunk in entry.chunks.iter().take(chunks) {
                let bytes = &mut buf[..chunk.size as usize];
                if file.read_exact(bytes).is_err() {
                    tracing::warn!(path = %entry.path, "a file the interrupted install wrote is short; starting over");
                    return None;
                }
                if ota_bundle::chunk_hash(bytes) != chunk.hash {
                    tracing::warn!(path = %entry.path, "the interrupted install's data does not match; starting over");
                    return None;
                }
                kept.total += chunk.size;
                if f == mark.file as usize {
                    kept.in_file += chunk.size;
                }
            }
            if f == mark.file as usize {
                kept.last_chunk = buf[..entry.chunks[chunks - 1].size as usize].to_vec();
            }
        }
        Some(kept)
    }
}

/// Whether a journal mark (a file on the data partition, so not to be trusted blindly) names a
/// chunk boundary of this manifest: its file exists, its chunk is at most the file's count
/// (the count itself: the file was written whole).
fn mark_within(manifest: &ota_bundle::Manifest, mark: &Mark) -> bool {
    manifest
        .files
        .get(mark.file as usize)
        .is_some_and(|file| mark.chunk as usize <= file.chunks.len())
}

/// What an interrupted install left intact before its journal mark.
#[derive(Debug, Default)]
struct Kept {
    /// Bytes of the whole release.
    total: u64,
    /// Bytes of the file at the mark (the length it is cut back to).
    in_file: u64,
    /// The last chunk before the mark in that file (empty at its start): the prefix of the
    /// next frame in format 2.
    last_chunk: Vec<u8>,
}

/// A journal mark after about this much data (each mark costs an fsync of the slot).
const JOURNAL_EVERY: u64 = 4 << 20;

/// Reads a chunk of the running release for a delta, and checks it against the signed hash
/// (a damaged running release must not leak into the new one).
fn copy_chunk(
    copies: &HashMap<String, (PathBuf, u64, u64)>,
    hash: &str,
) -> Result<Vec<u8>, ota_slots::WriteError> {
    use std::io::{Read, Seek};
    let missing = |path: PathBuf, why: String| ota_slots::WriteError::Io {
        path,
        source: std::io::Error::other(why),
    };
    let (path, offset, size) = copies.get(hash).ok_or_else(|| {
        missing(
            PathBuf::from("(running release)"),
            format!("chunk {hash} is not in the running release"),
        )
    })?;
    let mut bytes = vec![0u8; *size as usize];
    let mut file = std::fs::File::open(path).map_err(|e| missing(path.clone(), e.to_string()))?;
    file.seek(std::io::SeekFrom::Start(*offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| missing(path.clone(), e.to_string()))?;
    if ota_bundle::chunk_hash(&bytes) != hash {
        return Err(missing(
            path.clone(),
            "the running release's chunk does not match its hash".into(),
        ));
    }
    Ok(bytes)
}

/// Where each chunk of the running release (in `dir`, described by `manifest`) is: the file,
/// the offset and the size, by chunk hash; what a delta's copied chunks are read from.
fn copy_index(dir: &Path, manifest: &ota_bundle::Manifest) -> HashMap<String, (PathBuf, u64, u64)> {
    let mut index = HashMap::new();
    for file in &manifest.files {
        for (i, chunk) in file.chunks.iter().enumerate() {
            index.entry(chunk.hash.clone()).or_insert((
                dir.join(&file.path),
                i as u64 * ota_bundle::CHUNK_SIZE,
                chunk.size,
            ));
        }
    }
    index
}

/// Bytes free for an unprivileged writer in `dir`'s file system. An error is an error, never
/// "unlimited".
fn free_bytes(dir: &Path) -> Result<u64, UpdateError> {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|errno| UpdateError::FreeSpace {
            path: dir.to_owned(),
            source: errno.into(),
        })
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(chunks_per_file: &[usize]) -> ota_bundle::Manifest {
        let chunk = ota_bundle::Chunk {
            hash: "00".repeat(32),
            size: 10,
            csize: Some(12),
            copy: false,
        };
        ota_bundle::Manifest {
            format: 2,
            product: "quote-edge".into(),
            version: "2.0.0".into(),
            security_version: 1,
            issued_at: 1,
            hash: "blake3".into(),
            chunk_size: ota_bundle::CHUNK_SIZE,
            base: None,
            files: chunks_per_file
                .iter()
                .enumerate()
                .map(|(i, n)| ota_bundle::FileEntry {
                    path: format!("bin/f{i}"),
                    mode: 0o755,
                    size: 10 * *n as u64,
                    digest: "00".repeat(32),
                    chunks: vec![chunk.clone(); *n],
                })
                .collect(),
        }
    }

    fn mark(file: u32, chunk: u32) -> Mark {
        Mark {
            digest: "d".repeat(64),
            slot: SlotName::B,
            file,
            chunk,
            offset: 0,
        }
    }

    #[test]
    fn a_crafted_journal_mark_outside_the_manifest_is_refused_not_trusted() {
        let m = manifest(&[3, 0, 2]);
        assert!(mark_within(&m, &mark(0, 0)));
        assert!(mark_within(&m, &mark(0, 3)), "a file written whole");
        assert!(mark_within(&m, &mark(2, 1)));
        assert!(!mark_within(&m, &mark(0, 4)), "past the file's chunks");
        assert!(
            !mark_within(&m, &mark(1, 1)),
            "an empty file has no chunk 1"
        );
        assert!(!mark_within(&m, &mark(3, 0)), "no fourth file");
        assert!(!mark_within(&m, &mark(u32::MAX, u32::MAX)));
    }
}
