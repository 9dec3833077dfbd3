//! Building a bundle from a release directory, and adding signatures to one.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::BundleError;
use crate::header::{HEADER_LEN, Header, MAX_MANIFEST_LEN, MAX_SIGNATURES, SIGNATURE_LEN};
use crate::keys::SecretKey;
use crate::manifest::{CHUNK_SIZE, Chunk, FileEntry, MAX_FILES, Manifest, check_path};
use crate::read::{read_unverified, signed_message};

#[derive(Debug, Clone)]
pub struct PackOptions {
    pub product: String,
    pub version: String,
    pub security_version: u64,
    /// Unix seconds; `ota pack` uses the build host's clock (informational only).
    pub issued_at: u64,
    /// zstd level (1-22).
    pub level: i32,
}

/// What `pack` produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackReport {
    pub files: usize,
    pub input_bytes: u64,
    pub bundle_bytes: u64,
}

/// Packs the regular files under `dir` into a bundle at `out`, signed with `key`. `progress` is
/// called with (bytes done, bytes total). Links, devices, sockets and FIFOs are refused: the
/// format cannot carry them and a release should not need them.
pub fn pack(
    dir: &Path,
    out: &Path,
    options: &PackOptions,
    key: &SecretKey,
    progress: impl FnMut(u64, u64),
) -> Result<PackReport, BundleError> {
    pack_against(dir, out, options, key, None, default_threads(), progress)
}

/// As [`pack`], a delta against the release `base` describes (the manifest of its bundle):
/// a chunk whose hash is in `base` is not carried but marked `copy`, for the installer to take
/// from the running release; the bundle names `base` by its [`Manifest::release_digest`].
pub fn pack_delta(
    dir: &Path,
    out: &Path,
    options: &PackOptions,
    key: &SecretKey,
    base: &Manifest,
    progress: impl FnMut(u64, u64),
) -> Result<PackReport, BundleError> {
    pack_against(
        dir,
        out,
        options,
        key,
        Some(base),
        default_threads(),
        progress,
    )
}

/// Levels at or above it first try `TRIAL_LEVEL`: a chunk that it cannot shrink by 1 %
/// (random or already compressed data) keeps that frame, which is what the high level would
/// make of it too (raw blocks), in a fraction of the time. The trial's window spans the
/// prefix and the chunk (`TRIAL_WINDOW_LOG`, where level 1 alone would see 512 KiB) and it
/// uses long-distance matching, so a chunk that repeats part of its prefix is found
/// compressible by the trial, as the high level would find it.
const TRIAL_FROM_LEVEL: i32 = 10;
const TRIAL_LEVEL: i32 = 1;
const TRIAL_WINDOW_LOG: u32 = 21;

/// One chunk as one zstd frame (with its content size), compressed with `prefix` (the
/// previous chunk of the file; empty for none) as a raw-content prefix that the installer
/// supplies again when it decompresses. A context per frame: zstd ties a prefix to its context.
fn compress_chunk(
    level: i32,
    prefix: &[u8],
    chunk: &[u8],
    frame: &mut Vec<u8>,
) -> std::io::Result<()> {
    if level >= TRIAL_FROM_LEVEL {
        compress_chunk_at(TRIAL_LEVEL, Some(TRIAL_WINDOW_LOG), prefix, chunk, frame)?;
        if frame.len() as u64 * 100 >= chunk.len() as u64 * 99 {
            return Ok(());
        }
    }
    compress_chunk_at(level, None, prefix, chunk, frame)
}

fn compress_chunk_at(
    level: i32,
    window_log: Option<u32>,
    prefix: &[u8],
    chunk: &[u8],
    frame: &mut Vec<u8>,
) -> std::io::Result<()> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let zstd = |code| std::io::Error::other(zstd::zstd_safe::get_error_name(code));
    let mut cctx = CCtx::try_create().ok_or_else(|| std::io::Error::other("zstd context"))?;
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(zstd)?;
    if let Some(log) = window_log {
        cctx.set_parameter(CParameter::WindowLog(log))
            .map_err(zstd)?;
        cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .map_err(zstd)?;
    }
    cctx.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(zstd)?;
    if !prefix.is_empty() {
        cctx.ref_prefix(prefix).map_err(zstd)?;
    }
    frame.clear();
    frame.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
    cctx.compress2(frame, chunk).map_err(zstd)?;
    Ok(())
}

/// The chunking that runs through a release's files: each file's chunks hashed, a chunk the
/// base already has marked `copy`, the others compressed (format 2: with the previous carried
/// chunk of the same file as the zstd prefix) and appended to the payload.
///
/// A frame's prefix is the previous chunk's uncompressed bytes, known before anything is
/// compressed, so frames are compressed on every core at once: chunks go to a pool of
/// compression threads as they are read, and their frames are written in order as they come
/// back, with at most `max_in_flight` chunks between the two. No thread waits for a slow
/// neighbour's frame before taking the next chunk. Each frame is compressed alone with the
/// same parameters, so the bundle is the same bytes whatever the number of threads.
struct Chunker<'a, W: Write> {
    in_base: std::collections::HashSet<&'a str>,
    /// The bundle being written, named in errors.
    out: &'a Path,
    payload: W,
    /// The manifest's file entries so far; a chunk's `csize` is filled once its frame is written.
    entries: Vec<FileEntry>,
    /// To the compression threads.
    jobs: std::sync::mpsc::Sender<Job>,
    /// From them: a frame and its sequence number, in any order.
    frames: std::sync::mpsc::Receiver<(u64, std::io::Result<Vec<u8>>)>,
    /// Where each chunk sent and not yet written belongs (file, chunk), oldest first; the
    /// front one is sequence number `written`.
    in_flight: std::collections::VecDeque<(usize, usize)>,
    max_in_flight: usize,
    /// Frames that came back before an older one.
    early: std::collections::BTreeMap<u64, Vec<u8>>,
    /// Frames written so far (the next one's sequence number).
    written: u64,
    /// Bytes of the release chunked so far.
    done: u64,
}

/// A carried chunk for the compression threads.
struct Job {
    seq: u64,
    /// The chunk before it in its file, when that one was carried too.
    prefix: Option<std::sync::Arc<Vec<u8>>>,
    data: std::sync::Arc<Vec<u8>>,
}

/// One compression thread: compresses chunks until the sender hangs up. Where panics unwind
/// (tests; release builds abort), a panic is turned into an error for that frame, so the
/// writer, waiting for it, never waits forever.
fn compress_jobs(
    level: i32,
    jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    frames: &std::sync::mpsc::Sender<(u64, std::io::Result<Vec<u8>>)>,
) {
    loop {
        let job = match jobs.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let prefix = job.prefix.as_deref().map_or(&[][..], Vec::as_slice);
        let frame = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut frame = Vec::new();
            compress_chunk(level, prefix, &job.data, &mut frame).map(|()| frame)
        }))
        .unwrap_or_else(|_| Err(std::io::Error::other("a compression thread panicked")));
        if frames.send((job.seq, frame)).is_err() {
            return; // the writer gave up
        }
    }
}

impl<W: Write> Chunker<'_, W> {
    /// One file of the release, `relative` in the bundle, read from `full`.
    fn file(
        &mut self,
        relative: &str,
        full: &Path,
        size: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<(), BundleError> {
        let read_err = |source| BundleError::Release {
            path: full.to_owned(),
            reason: format!("cannot read: {source}"),
        };
        let file = File::open(full).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o755;
        let mut reader = BufReader::new(file);
        let mut whole = blake3::Hasher::new();
        let index = self.entries.len();
        self.entries.push(FileEntry {
            path: relative.to_owned(),
            mode,
            size,
            digest: String::new(),
            chunks: Vec::new(),
        });
        // The previous chunk of this file, while it was carried: the next one's prefix.
        let mut prefix: Option<std::sync::Arc<Vec<u8>>> = None;
        let mut remaining = size;
        while remaining > 0 {
            let n = remaining.min(CHUNK_SIZE) as usize;
            let mut data = vec![0; n];
            reader.read_exact(&mut data).map_err(read_err)?;
            whole.update(&data);
            let hash = blake3::hash(&data).to_hex().to_string();
            let copy = self.in_base.contains(hash.as_str());
            let chunks = &mut self.entries[index].chunks;
            chunks.push(Chunk {
                hash,
                size: n as u64,
                csize: None,
                copy,
            });
            let place = (index, chunks.len() - 1);
            if copy {
                prefix = None;
            } else {
                let data = std::sync::Arc::new(data);
                self.send(prefix.replace(std::sync::Arc::clone(&data)), data, place)?;
            }
            remaining -= n as u64;
            self.done += n as u64;
            progress(self.done);
        }
        self.entries[index].digest = whole.finalize().to_hex().to_string();
        Ok(())
    }

    /// Hands a chunk to the compression threads, once fewer than `max_in_flight` are out.
    fn send(
        &mut self,
        prefix: Option<std::sync::Arc<Vec<u8>>>,
        data: std::sync::Arc<Vec<u8>>,
        place: (usize, usize),
    ) -> Result<(), BundleError> {
        while self.in_flight.len() >= self.max_in_flight {
            self.write_next()?;
        }
        let seq = self.written + self.in_flight.len() as u64;
        self.jobs.send(Job { seq, prefix, data }).map_err(|_| {
            self.write_error(std::io::Error::other("the compression threads stopped"))
        })?;
        self.in_flight.push_back(place);
        Ok(())
    }

    /// Waits for frames until the oldest one out is back, and writes every frame that is next
    /// in order.
    fn write_next(&mut self) -> Result<(), BundleError> {
        while !self.early.contains_key(&self.written) {
            let (seq, frame) = self.frames.recv().map_err(|_| {
                self.write_error(std::io::Error::other("the compression threads stopped"))
            })?;
            self.early
                .insert(seq, frame.map_err(|e| self.write_error(e))?);
        }
        while let Some(frame) = self.early.remove(&self.written) {
            let (file, chunk) = self.in_flight.pop_front().expect("a frame is out");
            self.payload
                .write_all(&frame)
                .map_err(|e| self.write_error(e))?;
            self.entries[file].chunks[chunk].csize = Some(frame.len() as u64);
            self.written += 1;
        }
        Ok(())
    }

    /// Writes every frame still out; the file entries are then complete.
    fn finish(mut self) -> Result<(W, Vec<FileEntry>), BundleError> {
        while !self.in_flight.is_empty() {
            self.write_next()?;
        }
        Ok((self.payload, self.entries))
    }

    fn write_error(&self, source: std::io::Error) -> BundleError {
        BundleError::Write {
            path: self.out.to_owned(),
            source,
        }
    }
}

/// Most compression threads `pack` uses: each holds a level-19 zstd context (about 40 MiB) and
/// two chunks in flight (with their frames), so a big build host does not turn into gigabytes.
const MAX_THREADS: usize = 8;

/// Compression threads for `pack`: every core the process may use, up to [`MAX_THREADS`].
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_THREADS)
}

/// [`pack`] or [`pack_delta`], compressing on `threads` threads (at least one).
pub(crate) fn pack_against(
    dir: &Path,
    out: &Path,
    options: &PackOptions,
    key: &SecretKey,
    base: Option<&Manifest>,
    threads: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<PackReport, BundleError> {
    let in_base: std::collections::HashSet<&str> = base
        .iter()
        .flat_map(|m| m.files.iter())
        .flat_map(|f| f.chunks.iter().map(|c| c.hash.as_str()))
        .collect();
    let files = release_files(dir)?;
    let total: u64 = files.iter().map(|(_, _, size)| size).sum();
    let out_dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Write { path, source }
    };
    // Frames go to a temporary file beside the output, then after the header and manifest.
    let mut payload = tempfile::tempfile_in(out_dir).map_err(write_err(out_dir))?;
    let threads = threads.max(1);
    let (job_tx, job_rx) = std::sync::mpsc::channel();
    let (frame_tx, frame_rx) = std::sync::mpsc::channel();
    let job_rx = std::sync::Mutex::new(job_rx);
    let level = options.level;
    let entries = std::thread::scope(|scope| {
        for _ in 0..threads {
            let frame_tx = frame_tx.clone();
            let job_rx = &job_rx;
            scope.spawn(move || compress_jobs(level, job_rx, &frame_tx));
        }
        drop(frame_tx);
        // On return, early or not, the chunker's sender is dropped and the threads end.
        let mut chunker = Chunker {
            in_base,
            out,
            payload: BufWriter::new(&mut payload),
            entries: Vec::with_capacity(files.len()),
            jobs: job_tx,
            frames: frame_rx,
            in_flight: std::collections::VecDeque::new(),
            max_in_flight: 2 * threads,
            early: std::collections::BTreeMap::new(),
            written: 0,
            done: 0,
        };
        for (relative, full, size) in &files {
            chunker.file(relative, full, *size, |done| progress(done, total))?;
        }
        let (mut writer, entries) = chunker.finish()?;
        writer.flush().map_err(write_err(out))?;
        Ok::<_, BundleError>(entries)
    })?;
    let manifest = Manifest {
        format: crate::manifest::FORMAT_PREFIXED,
        product: options.product.clone(),
        version: options.version.clone(),
        security_version: options.security_version,
        issued_at: options.issued_at,
        hash: "blake3".into(),
        chunk_size: CHUNK_SIZE,
        base: base.map(|b| crate::manifest::Base {
            version: b.version.clone(),
            digest: b.release_digest(),
        }),
        files: entries,
    };
    manifest.validate()?;
    let manifest_bytes = manifest.to_canonical();
    if manifest_bytes.len() > MAX_MANIFEST_LEN as usize {
        return Err(BundleError::Manifest(format!(
            "{} bytes, more than the 1 MiB limit",
            manifest_bytes.len()
        )));
    }
    let signature = (
        key.public().id(),
        key.sign(&signed_message(&manifest_bytes)),
    );
    payload.rewind().map_err(write_err(out))?;
    let bundle_bytes = assemble(
        out,
        &manifest_bytes,
        &[signature],
        manifest.payload_len(),
        &mut payload,
    )?;
    Ok(PackReport {
        files: files.len(),
        input_bytes: total,
        bundle_bytes,
    })
}

/// Writes header, manifest, signatures and payload to `out` atomically (temporary file, fsync,
/// rename, fsync of the directory), so a crash never leaves half a bundle under the final name.
pub(crate) fn assemble(
    out: &Path,
    manifest: &[u8],
    signatures: &[crate::read::Signature],
    payload_len: u64,
    payload: &mut impl Read,
) -> Result<u64, BundleError> {
    let write_err = |source| BundleError::Write {
        path: out.to_owned(),
        source,
    };
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
    {
        let mut w = BufWriter::new(temp.as_file_mut());
        let header = Header {
            manifest_len: manifest.len() as u32,
            signature_count: signatures.len() as u16,
            payload_len,
        };
        w.write_all(&header.encode()).map_err(write_err)?;
        w.write_all(manifest).map_err(write_err)?;
        for (id, signature) in signatures {
            w.write_all(&id.0).map_err(write_err)?;
            w.write_all(signature).map_err(write_err)?;
        }
        let copied = std::io::copy(&mut payload.take(payload_len), &mut w).map_err(write_err)?;
        if copied != payload_len {
            return Err(BundleError::Truncated {
                what: "payload",
                offset: copied,
                needed: payload_len - copied,
            });
        }
        w.flush().map_err(write_err)?;
    }
    let size = HEADER_LEN as u64
        + manifest.len() as u64
        + (signatures.len() * SIGNATURE_LEN) as u64
        + payload_len;
    // Until the rename the temporary file is deleted if anything fails; after it, there is
    // nothing left to delete.
    let mut temp = temp.into_temp_path();
    durable::persist(&mut durable::StdFs, &temp, out)?;
    temp.disable_cleanup(true);
    Ok(size)
}

/// Adds `key`'s signature to the bundle at `path` (k-of-n signing), rewriting it atomically.
/// Signing again with a key that already signed is refused.
pub fn add_signature(path: &Path, key: &SecretKey) -> Result<usize, BundleError> {
    let read_err = |source| BundleError::Read { offset: 0, source };
    let mut file = BufReader::new(File::open(path).map_err(read_err)?);
    let crate::read::Unverified {
        header,
        manifest: manifest_bytes,
        mut signatures,
        ..
    } = read_unverified(&mut file)?;
    // Refuse to sign what could not be installed.
    Manifest::parse_canonical(&manifest_bytes)?;
    let id = key.public().id();
    if signatures.iter().any(|(existing, _)| *existing == id) {
        return Err(BundleError::Key {
            path: path.to_owned(),
            reason: format!("is already signed by key {id}"),
        });
    }
    if signatures.len() >= MAX_SIGNATURES as usize {
        return Err(BundleError::Key {
            path: path.to_owned(),
            reason: "already has the most signatures a bundle may carry (16)".into(),
        });
    }
    signatures.push((id, key.sign(&signed_message(&manifest_bytes))));
    assemble(
        path,
        &manifest_bytes,
        &signatures,
        header.payload_len,
        &mut file,
    )?;
    Ok(signatures.len())
}

/// The regular files under `dir`, sorted by their release path, with their sizes.
fn release_files(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>, BundleError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        let release_err = |path: &Path, reason: String| BundleError::Release {
            path: path.to_owned(),
            reason,
        };
        let entries = std::fs::read_dir(&current)
            .map_err(|e| release_err(&current, format!("cannot list: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| release_err(&current, e.to_string()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| release_err(&path, e.to_string()))?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let relative = path
                    .strip_prefix(dir)
                    .ok()
                    .and_then(|p| p.to_str())
                    .ok_or_else(|| release_err(&path, "the path is not UTF-8".into()))?
                    .to_owned();
                check_path(&relative).map_err(|reason| release_err(&path, reason))?;
                let size = entry
                    .metadata()
                    .map_err(|e| release_err(&path, e.to_string()))?
                    .len();
                files.push((relative, path, size));
            } else {
                let what = if kind.is_symlink() {
                    "a symbolic link"
                } else if kind.is_block_device() || kind.is_char_device() {
                    "a device file"
                } else if kind.is_fifo() {
                    "a FIFO"
                } else {
                    "not a regular file"
                };
                return Err(release_err(
                    &path,
                    format!("is {what}; a release holds regular files only"),
                ));
            }
        }
    }
    if files.is_empty() {
        return Err(BundleError::Release {
            path: dir.to_owned(),
            reason: "holds no files".into(),
        });
    }
    if files.len() > MAX_FILES {
        return Err(BundleError::Release {
            path: dir.to_owned(),
            reason: format!("holds {} files, more than {MAX_FILES}", files.len()),
        });
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes no compressor can shrink, and bytes any can (a few words repeated); and a chunk
    /// of fresh noise that starts with the last 700 KiB of the first noise (where level 1's
    /// own window of 512 KiB would not reach).
    fn noise_and_text() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut noise = vec![0; 2 * CHUNK_SIZE as usize];
        fastrand::Rng::with_seed(7).fill(&mut noise);
        let fresh = noise.split_off(CHUNK_SIZE as usize);
        let back = 700 << 10;
        let mut repeat = noise[noise.len() - back..].to_vec();
        repeat.extend_from_slice(&fresh[..noise.len() - back]);
        let words = b"quote edge replica probe rollout ";
        let text = (0..CHUNK_SIZE as usize)
            .map(|i| words[(i * 7 + i / 97) % words.len()])
            .collect();
        (noise, text, repeat)
    }

    #[test]
    fn an_incompressible_chunk_keeps_the_trial_frame_and_a_compressible_one_the_level_asked() {
        let (noise, text, repeat) = noise_and_text();
        let mut frame = Vec::new();
        let mut trial = Vec::new();
        let cases = [
            (&[][..], &noise, "noise"),
            (&text[..], &noise, "noise"),
            (&noise[..], &text, "text"),
            (&noise[..], &repeat, "a repeat of its prefix 700 KiB back"),
        ];
        for (prefix, chunk, what) in cases {
            compress_chunk(19, prefix, chunk, &mut frame).unwrap();
            compress_chunk_at(
                TRIAL_LEVEL,
                Some(TRIAL_WINDOW_LOG),
                prefix,
                chunk,
                &mut trial,
            )
            .unwrap();
            match what {
                "noise" => {
                    assert_eq!(frame, trial, "noise: the trial frame, not a level-19 pass");
                    assert!(frame.len() < chunk.len() + 1024, "stored, not grown");
                }
                "text" => assert!(frame.len() < trial.len(), "text: compressed at level 19"),
                _ => assert!(
                    frame.len() < chunk.len() * 2 / 5,
                    "{what}: found through the prefix ({} bytes)",
                    frame.len()
                ),
            }
            let mut out = vec![0; chunk.len()];
            let produced = crate::read::decompress_chunk(prefix, &frame, &mut out).unwrap();
            assert_eq!(
                &out[..produced],
                &chunk[..],
                "the frame decodes to the chunk"
            );
        }
    }
}
