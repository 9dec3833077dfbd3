//! Files that survive a power cut: one way to put new content under a name so that, whenever
//! the power goes, the name holds either the old content or the new one, never a mix.
//!
//! The order is always the same (Bottlerocket's and SQLite's): write a temporary file in the
//! same directory, fsync it, rename it over the final name, fsync the directory. The rename is
//! the instant the content changes; the first fsync makes sure the renamed file is not empty
//! after a crash (ext4 and vfat may otherwise persist the rename before the data), the last one
//! makes the rename itself outlive a power cut.
//!
//! [`replace`] does all four steps for bytes in memory; [`persist`] does the last three for a
//! temporary file something else wrote (SQLite's `VACUUM INTO`, a bundle streamed to disk).
//! Every step goes through the [`Fs`] trait, so tests (and the power-cut harness's fail points
//! in `ota-slots`) can cut the sequence at any step; [`StdFs`] is the plain file system.
//!
//! Architecture invariant: this crate knows no caller's format and no OTA or database types;
//! it only orders writes, fsyncs and renames.

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file operations an atomic replace performs, in this order: [`Fs::write_new`] (the
/// temporary file), [`Fs::sync_file`], [`Fs::rename`], [`Fs::sync_dir`].
pub trait Fs {
    /// Creates (or truncates) `path` and writes `bytes` to it.
    fn write_new(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
    /// Flushes `path`'s content and metadata to the device.
    fn sync_file(&mut self, path: &Path) -> std::io::Result<()>;
    /// Renames `from` over `to` (atomic within one file system).
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Flushes the directory `dir`, so that a rename in it is on the device.
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()>;
}

/// The real file system through `std`, with no fault injection.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

impl Fs for StdFs {
    fn write_new(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::File::create(path)?.write_all(bytes)
    }
    fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
        // Opened for writing: some file systems refuse to fsync a read-only descriptor.
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .sync_all()
    }
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The step of a replace that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    WriteTemporary,
    SyncTemporary,
    Rename,
    SyncDirectory,
}

impl Step {
    /// The step in words, as error messages show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::WriteTemporary => "write temporary file",
            Step::SyncTemporary => "fsync temporary file",
            Step::Rename => "rename",
            Step::SyncDirectory => "fsync directory",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A replace of `path` that stopped at `step`.
#[derive(Debug, thiserror::Error)]
#[error("cannot replace {path} ({step}): {source}")]
pub struct Error {
    /// The final name (not the temporary file).
    pub path: PathBuf,
    pub step: Step,
    #[source]
    pub source: std::io::Error,
}

impl Error {
    /// True when the new content is already under the final name (only the directory fsync
    /// failed): a power cut now may still bring back the old content, but the caller must not
    /// act as if the old content were in force.
    pub fn renamed(&self) -> bool {
        self.step == Step::SyncDirectory
    }
}

/// The temporary file [`replace`] writes before renaming it to `path`: `<name>.tmp` beside it.
/// A fixed name, so that a leftover from a cut is overwritten by the next replace instead of
/// piling up.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(OsString::from).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces the content of `path` with `bytes` atomically: [`temp_path`] written and fsynced,
/// renamed over `path`, then the directory fsynced. On an error before the rename `path` is
/// untouched (a `.tmp` file may be left, which the next replace overwrites).
pub fn replace(fs: &mut impl Fs, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let temp = temp_path(path);
    fs.write_new(&temp, bytes)
        .map_err(failed(path, Step::WriteTemporary))?;
    persist(fs, &temp, path)
}

/// Moves `temp`, a complete file something else wrote in the same directory as `path`, to
/// `path` atomically: `temp` fsynced, renamed over `path`, then the directory fsynced. On an
/// error before the rename `path` is untouched and `temp` is left to the caller.
pub fn persist(fs: &mut impl Fs, temp: &Path, path: &Path) -> Result<(), Error> {
    fs.sync_file(temp)
        .map_err(failed(path, Step::SyncTemporary))?;
    fs.rename(temp, path).map_err(failed(path, Step::Rename))?;
    fs.sync_dir(parent(path))
        .map_err(failed(path, Step::SyncDirectory))
}

/// Creates `dir` and its missing parents, like `std::fs::create_dir_all`, and fsyncs the
/// directory above each one it made, so that the new names outlive a power cut: without it a
/// file synced inside a directory made a moment ago can vanish with the directory.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    // Deepest first is fine: each fsync makes one name durable, in any order, before return.
    for made in missing {
        StdFs.sync_dir(parent(made))?;
    }
    Ok(())
}

fn failed(path: &Path, step: Step) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error { path, step, source }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// For tests: a power cut at operation `n` (0-based). The operations before it run on the
/// inner file system; operation `n` and every one after fail, and a cut `write_new` leaves
/// the first half of its bytes behind, as a write torn by the power would.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct CutAt<F> {
    inner: F,
    n: usize,
    seen: usize,
}

#[cfg(any(test, feature = "testing"))]
impl<F: Fs> CutAt<F> {
    pub fn new(inner: F, n: usize) -> CutAt<F> {
        CutAt { inner, n, seen: 0 }
    }

    /// Fails with the power cut when the operation about to run is cut.
    fn step(&mut self) -> std::io::Result<()> {
        let this = self.seen;
        self.seen += 1;
        if this >= self.n {
            Err(std::io::Error::other("power cut"))
        } else {
            Ok(())
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl<F: Fs> Fs for CutAt<F> {
    fn write_new(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if let Err(cut) = self.step() {
            self.inner.write_new(path, &bytes[..bytes.len() / 2])?;
            return Err(cut);
        }
        self.inner.write_new(path, bytes)
    }
    fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
        self.step()?;
        self.inner.sync_file(path)
    }
    fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.step()?;
        self.inner.rename(from, to)
    }
    fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        self.step()?;
        self.inner.sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &[u8] = b"the old content, complete";
    const NEW: &[u8] = b"the new content, also complete and longer";

    /// Remembers every operation, to check the order and the paths.
    #[derive(Default)]
    struct Record(Vec<String>);

    impl Fs for Record {
        fn write_new(&mut self, path: &Path, _: &[u8]) -> std::io::Result<()> {
            self.0.push(format!("write {}", path.display()));
            Ok(())
        }
        fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
            self.0.push(format!("sync {}", path.display()));
            Ok(())
        }
        fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.0
                .push(format!("rename {} {}", from.display(), to.display()));
            Ok(())
        }
        fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
            self.0.push(format!("sync dir {}", dir.display()));
            Ok(())
        }
    }

    /// The property of both functions: a cut at or before the rename (operation `rename_at`)
    /// leaves the old content and says so; a later one leaves the new content, and only the
    /// directory fsync can still have failed.
    fn assert_old_or_new(n: usize, rename_at: usize, result: Result<(), Error>, path: &Path) {
        let content = std::fs::read(path).unwrap();
        if n <= rename_at {
            assert!(!result.unwrap_err().renamed(), "cut at step {n}");
            assert_eq!(content, OLD, "cut at step {n}");
        } else {
            assert_eq!(result.is_err(), n == rename_at + 1, "cut at step {n}");
            assert!(result.err().is_none_or(|e| e.renamed()));
            assert_eq!(content, NEW, "cut at step {n}");
        }
    }

    #[test]
    fn a_cut_at_every_step_of_a_replace_leaves_the_old_or_the_new_content() {
        for n in 0..=4 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.json");
            std::fs::write(&path, OLD).unwrap();
            let result = replace(&mut CutAt::new(StdFs, n), &path, NEW);
            assert_old_or_new(n, 2, result, &path);
        }
    }

    #[test]
    fn a_cut_at_every_step_of_a_persist_leaves_the_old_or_the_new_content() {
        for n in 0..=3 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("snapshot.db");
            let temp = dir.path().join("snapshot.tmp");
            std::fs::write(&path, OLD).unwrap();
            std::fs::write(&temp, NEW).unwrap();
            let result = persist(&mut CutAt::new(StdFs, n), &temp, &path);
            // Before the rename the caller's temporary file is still the caller's, intact.
            assert_eq!(temp.exists(), n <= 1, "cut at step {n}");
            assert_old_or_new(n, 1, result, &path);
        }
    }

    #[test]
    fn a_first_replace_cut_before_the_rename_leaves_no_file_under_the_name() {
        for n in 0..=1 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("new.json");
            assert!(replace(&mut CutAt::new(StdFs, n), &path, NEW).is_err());
            assert!(!path.exists(), "cut at step {n}");
            // The torn temporary file is overwritten by the next replace, not appended to.
            replace(&mut StdFs, &path, NEW).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), NEW);
            assert!(!temp_path(&path).exists());
        }
    }

    #[test]
    fn the_temporary_file_is_a_sibling_and_the_steps_run_in_order() {
        let mut fs = Record::default();
        replace(&mut fs, Path::new("/data/ota/state.json"), NEW).unwrap();
        assert_eq!(
            fs.0,
            [
                "write /data/ota/state.json.tmp",
                "sync /data/ota/state.json.tmp",
                "rename /data/ota/state.json.tmp /data/ota/state.json",
                "sync dir /data/ota",
            ]
        );
        let mut fs = Record::default();
        replace(&mut fs, Path::new("bare"), NEW).unwrap();
        assert_eq!(fs.0.last().unwrap(), "sync dir .");
    }

    #[test]
    fn an_error_names_the_final_path_and_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir/receipt.json");
        let error = replace(&mut StdFs, &path, NEW).unwrap_err();
        assert_eq!(error.step, Step::WriteTemporary);
        let message = error.to_string();
        assert!(
            message.contains("missing-dir/receipt.json (write temporary file)"),
            "{message}"
        );
    }
}
