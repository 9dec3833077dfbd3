//! Writing a release into a slot directory, chunk by chunk, from bytes the caller has already
//! verified (the agent feeds it from `ota_bundle::Bundle::chunks`). Each file is synced when
//! complete and the directories at the end. Over an older release ([`SlotWriter::update`]), a
//! chunk whose bytes the slot already holds at that place is not written again (less flash
//! wear, and an A/B update of a mostly unchanged release writes little).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("slot path {path:?} is not a plain relative path")]
    BadPath { path: String },
    #[error("cannot write {path} in the slot: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} in the slot is not a file of ours ({links} links, owner {owner}): refusing to write through it"
    )]
    NotOurs {
        path: PathBuf,
        links: u64,
        owner: u32,
    },
    #[error("{path}: chunks arrived out of order (expected chunk {expected}, got {got})")]
    OutOfOrder {
        path: String,
        expected: usize,
        got: usize,
    },
}

/// Writes one release into `dir`.
#[derive(Debug)]
pub struct SlotWriter {
    dir: PathBuf,
    current: Option<Open>,
    dirs: Vec<PathBuf>,
    /// Bytes of the release passed in so far (written or found unchanged).
    written: u64,
    /// Of those, bytes the slot already held at their place (not written).
    unchanged: u64,
    /// The slot's old bytes under the chunk being compared (one chunk, reused).
    scratch: Vec<u8>,
}

#[derive(Debug)]
struct Open {
    path: String,
    file: File,
    mode: u32,
    next_chunk: usize,
    /// Where the next chunk goes.
    offset: u64,
}

impl SlotWriter {
    /// Empties the slot directory (the slot must already be marked `installing`): an update
    /// that keeps nothing.
    pub fn create(dir: &Path) -> Result<SlotWriter, WriteError> {
        SlotWriter::update(dir, &[])
    }

    /// Prepares `dir` (the slot must already be marked `installing`) for a release made of
    /// `paths`: files the slot holds under those names are kept, to be compared chunk by chunk
    /// and rewritten only where they differ; everything else (other files, links, anything
    /// not a regular file or a directory) is removed.
    pub fn update(dir: &Path, paths: &[&str]) -> Result<SlotWriter, WriteError> {
        let mut writer = SlotWriter::new(dir);
        let mut keep = HashSet::new();
        let mut parents = HashSet::new();
        for path in paths {
            let relative = writer.relative(path)?.to_owned();
            parents.extend(relative.ancestors().skip(1).map(Path::to_path_buf));
            keep.insert(relative);
        }
        let io = |source| WriteError::Io {
            path: dir.to_owned(),
            source,
        };
        // The slot itself must be a directory of ours, not a link to one elsewhere.
        if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(dir).map_err(io)?;
        }
        writer.dirs.extend(make_dirs(dir).map_err(io)?);
        prune(dir, Path::new(""), &keep, &parents)?;
        collect_dirs(dir, &mut writer.dirs);
        failpoint::hit("slot.emptied");
        Ok(writer)
    }

    fn new(dir: &Path) -> SlotWriter {
        SlotWriter {
            dir: dir.to_owned(),
            current: None,
            dirs: vec![dir.to_owned()],
            written: 0,
            unchanged: 0,
            scratch: Vec::new(),
        }
    }

    /// Bytes passed in that the slot already held at their place (not written).
    pub fn unchanged(&self) -> u64 {
        self.unchanged
    }

    /// Continues an interrupted install in `dir` (not emptied): `later` files (after the one
    /// being resumed, in manifest order) are removed if present, and `path` is cut back to
    /// `keep` bytes (the chunks before `next_chunk`, which the caller re-hashed) and reopened
    /// for appending.
    pub fn resume(
        dir: &Path,
        path: &str,
        mode: u32,
        next_chunk: usize,
        keep: u64,
        later: &[&str],
    ) -> Result<SlotWriter, WriteError> {
        let mut writer = SlotWriter::new(dir);
        writer.written = keep;
        for later in later {
            let full = writer.dir.join(writer.relative(later)?);
            match std::fs::remove_file(&full) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(WriteError::Io {
                        path: full,
                        source: e,
                    });
                }
                _ => {}
            }
        }
        let full = writer.dir.join(writer.relative(path)?);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent).map_err(|source| WriteError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        collect_dirs(dir, &mut writer.dirs);
        let io = |source| WriteError::Io {
            path: full.clone(),
            source,
        };
        // No link is followed: the slot holds only what this writer created.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&full)
            .map_err(io)?;
        check_ours(&file, &full)?;
        file.set_len(keep).map_err(io)?;
        failpoint::hit("slot.resumed");
        writer.current = Some(Open {
            path: path.to_owned(),
            file,
            mode,
            next_chunk,
            offset: keep,
        });
        Ok(writer)
    }

    /// Makes everything written so far durable (the current file and every directory), so
    /// that a journal mark may cover it.
    pub fn sync(&mut self) -> Result<(), WriteError> {
        if let Some(open) = &self.current {
            failpoint::sync("slot.synced", || open.file.sync_data()).map_err(|source| {
                WriteError::Io {
                    path: self.dir.join(&open.path),
                    source,
                }
            })?;
        }
        self.sync_dirs()
    }

    /// The slot's directories get mode 0755 whatever the umask (the unit's is 0077), as its
    /// files get their manifest's mode: replicas may run as a user of their own, who must reach
    /// `bin/`. Directories above the slot keep theirs.
    fn publish_dirs(&self) -> Result<(), WriteError> {
        for dir in self.dirs.iter().filter(|d| d.starts_with(&self.dir)) {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(
                |source| WriteError::Io {
                    path: dir.clone(),
                    source,
                },
            )?;
        }
        Ok(())
    }

    fn sync_dirs(&self) -> Result<(), WriteError> {
        for dir in &self.dirs {
            failpoint::sync("slot.dirs_synced", || File::open(dir)?.sync_all()).map_err(
                |source| WriteError::Io {
                    path: dir.clone(),
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Puts verified chunk `index` of `path` after the previous one (mode applied when the file
    /// is complete); bytes the file already holds there are left as they are.
    pub fn chunk(
        &mut self,
        path: &str,
        mode: u32,
        index: usize,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        if self.current.as_ref().is_none_or(|open| open.path != path) {
            self.finish_file()?;
            self.open(path, mode)?;
        }
        let open = self.current.as_mut().expect("opened above");
        if index != open.next_chunk {
            return Err(WriteError::OutOfOrder {
                path: path.to_owned(),
                expected: open.next_chunk,
                got: index,
            });
        }
        if let Some(cut) = failpoint::cut_bytes(self.written, bytes.len()) {
            let _ = open.file.write_all_at(&bytes[..cut], open.offset);
            failpoint::abort();
        }
        self.scratch.resize(bytes.len(), 0);
        // A short file or a read error only means "write it".
        let same = open
            .file
            .read_exact_at(&mut self.scratch, open.offset)
            .is_ok()
            && self.scratch[..] == *bytes;
        if same {
            self.unchanged += bytes.len() as u64;
        } else {
            open.file
                .write_all_at(bytes, open.offset)
                .map_err(|source| WriteError::Io {
                    path: self.dir.join(path),
                    source,
                })?;
        }
        open.next_chunk += 1;
        open.offset += bytes.len() as u64;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// An empty file (no chunks).
    pub fn empty_file(&mut self, path: &str, mode: u32) -> Result<(), WriteError> {
        self.finish_file()?;
        self.open(path, mode)?;
        self.finish_file()
    }

    /// Syncs the last file and every directory; returns the bytes written.
    pub fn finish(mut self) -> Result<u64, WriteError> {
        self.finish_file()?;
        self.publish_dirs()?;
        self.sync_dirs()?;
        failpoint::hit("slot.dirs_synced");
        Ok(self.written)
    }

    /// The manifest was validated already; this is the writer's own guard.
    fn relative<'p>(&self, path: &'p str) -> Result<&'p Path, WriteError> {
        let relative = Path::new(path);
        if path.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(WriteError::BadPath {
                path: path.to_owned(),
            });
        }
        Ok(relative)
    }

    fn open(&mut self, path: &str, mode: u32) -> Result<(), WriteError> {
        let full = self.dir.join(self.relative(path)?);
        if let Some(parent) = full.parent()
            && !self.dirs.iter().any(|d| d == parent)
        {
            std::fs::create_dir_all(parent).map_err(|source| WriteError::Io {
                path: parent.to_owned(),
                source,
            })?;
            // Every directory made on the way is synced with the rest, or a cut could take
            // away the name of one in the middle (`share` of `share/doc/x`).
            for made in parent.ancestors().take_while(|d| *d != self.dir) {
                if !self.dirs.iter().any(|d| d == made) {
                    self.dirs.push(made.to_owned());
                }
            }
        }
        // A file kept by `update` is reused; a link is never followed (and `update` removed
        // any).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&full)
            .map_err(|source| WriteError::Io {
                path: full.clone(),
                source,
            })?;
        check_ours(&file, &full)?;
        self.current = Some(Open {
            path: path.to_owned(),
            file,
            mode,
            next_chunk: 0,
            offset: 0,
        });
        Ok(())
    }

    /// Finishes the current file (length, mode, fsync); also done when the next one starts,
    /// but a caller that knows the last chunk was written calls it at once.
    pub fn finish_file(&mut self) -> Result<(), WriteError> {
        if let Some(open) = self.current.take() {
            let path = self.dir.join(&open.path);
            let io = |source| WriteError::Io {
                path: path.clone(),
                source,
            };
            // An older, longer file is cut to this release's length.
            open.file.set_len(open.offset).map_err(io)?;
            // The mode first, so that the sync makes it durable with the content.
            open.file
                .set_permissions(std::fs::Permissions::from_mode(open.mode & 0o755))
                .map_err(io)?;
            failpoint::sync("slot.file_synced", || open.file.sync_all()).map_err(io)?;
            failpoint::hit("slot.file_synced");
        }
        Ok(())
    }
}

/// Removes from `dir` (at `at`, relative to the slot) everything that is neither a file to
/// keep nor a directory on the way to one.
fn prune(
    dir: &Path,
    at: &Path,
    keep: &HashSet<PathBuf>,
    parents: &HashSet<PathBuf>,
) -> Result<(), WriteError> {
    let io = |path: PathBuf| move |source| WriteError::Io { path, source };
    let here = dir.join(at);
    for entry in std::fs::read_dir(&here).map_err(io(here.clone()))? {
        let entry = entry.map_err(io(here.clone()))?;
        let relative = at.join(entry.file_name());
        let kind = entry.file_type().map_err(io(entry.path()))?;
        if kind.is_dir() && parents.contains(&relative) {
            prune(dir, &relative, keep, parents)?;
        } else if kind.is_dir() {
            std::fs::remove_dir_all(entry.path()).map_err(io(entry.path()))?;
        } else if !(kind.is_file() && keep.contains(&relative) && ours(&entry.path())) {
            // A hard link planted in the slot would carry writes to its other name (the
            // database, say): only a file with one link, owned by us, is kept.
            std::fs::remove_file(entry.path()).map_err(io(entry.path()))?;
        }
    }
    Ok(())
}

/// A file this writer may write through: its only link, owned by the writer's user.
fn ours(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    path.symlink_metadata()
        .is_ok_and(|m| m.nlink() == 1 && m.uid() == rustix::process::geteuid().as_raw())
}

/// Refuses to write through `file` (opened from `path`) unless it is [`ours`].
fn check_ours(file: &File, path: &Path) -> Result<(), WriteError> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().map_err(|source| WriteError::Io {
        path: path.to_owned(),
        source,
    })?;
    if meta.nlink() != 1 || meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(WriteError::NotOurs {
            path: path.to_owned(),
            links: meta.nlink(),
            owner: meta.uid(),
        });
    }
    Ok(())
}

/// Creates `dir` and its missing parents (`create_dir_all`); returns the directories whose
/// entries that changed: the nearest one that existed and each one made but `dir` (already
/// in the writer's list). They are fsynced with the slot, or a cut could take away the slot's
/// own name (`ota/slots/b` on a first install) and every journal mark with it.
fn make_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    Ok(missing
        .iter()
        .filter_map(|made| made.parent())
        .filter(|parent| !parent.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .collect())
}

/// Every directory under `dir` (to be synced at the end of a resumed install).
fn collect_dirs(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let path = entry.path();
            into.push(path.clone());
            collect_dirs(&path, into);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_link_planted_in_the_slot_is_replaced_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("b");
        std::fs::create_dir_all(slot.join("bin")).unwrap();
        // The database, hard-linked into the slot under the name of a release file.
        let database = dir.path().join("quotes.db");
        std::fs::write(&database, b"precious").unwrap();
        std::fs::hard_link(&database, slot.join("bin/quote-service")).unwrap();
        let mut w = SlotWriter::update(&slot, &["bin/quote-service"]).unwrap();
        w.chunk("bin/quote-service", 0o755, 0, b"new release")
            .unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&database).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(slot.join("bin/quote-service")).unwrap(),
            b"new release"
        );
        // Planted after the slot was prepared: the write is refused, not carried through.
        std::fs::remove_file(slot.join("bin/quote-service")).unwrap();
        let mut w = SlotWriter::update(&slot, &["bin/quote-service"]).unwrap();
        std::fs::hard_link(&database, slot.join("bin/quote-service")).unwrap();
        let error = w
            .chunk("bin/quote-service", 0o755, 0, b"new release")
            .unwrap_err();
        assert!(
            matches!(error, WriteError::NotOurs { links: 2, .. }),
            "{error}"
        );
        assert_eq!(std::fs::read(&database).unwrap(), b"precious");
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_slots_directories_are_searchable_whatever_the_umask_and_its_parent_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let slots = dir.path().join("slots");
        std::fs::create_dir(&slots).unwrap();
        std::fs::set_permissions(&slots, std::fs::Permissions::from_mode(0o711)).unwrap();
        let slot = slots.join("a");
        // As the unit's UMask=0077 would make them.
        std::fs::create_dir_all(slot.join("share/doc")).unwrap();
        std::fs::set_permissions(slot.join("share"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let mut w = SlotWriter::update(&slot, &["bin/svc", "share/doc/x"]).unwrap();
        w.chunk("bin/svc", 0o755, 0, b"release").unwrap();
        w.empty_file("share/doc/x", 0o644).unwrap();
        w.finish().unwrap();
        for made in ["", "bin", "share", "share/doc"] {
            assert_eq!(mode_of(&slot.join(made)), 0o755, "{made:?}");
        }
        assert_eq!(mode_of(&slots), 0o711);
    }

    #[test]
    fn files_are_written_in_order_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("a");
        std::fs::create_dir_all(slot.join("stale")).unwrap();
        std::fs::write(slot.join("stale/old"), b"x").unwrap();
        let mut w = SlotWriter::create(&slot).unwrap();
        w.chunk("bin/svc", 0o755, 0, b"hello ").unwrap();
        w.chunk("bin/svc", 0o755, 1, b"world").unwrap();
        w.empty_file("etc/empty", 0o644).unwrap();
        assert_eq!(w.finish().unwrap(), 11);
        assert_eq!(std::fs::read(slot.join("bin/svc")).unwrap(), b"hello world");
        assert_eq!(mode_of(&slot.join("bin/svc")), 0o755);
        assert!(!slot.join("stale").exists(), "the slot is emptied first");
    }

    #[test]
    fn an_update_writes_only_the_chunks_that_differ_and_removes_what_the_release_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("a");
        let mut w = SlotWriter::create(&slot).unwrap();
        w.chunk("bin/svc", 0o755, 0, b"aaaa").unwrap();
        w.chunk("bin/svc", 0o755, 1, b"bbbb").unwrap();
        w.chunk("bin/svc", 0o755, 2, b"cc").unwrap();
        w.chunk("etc/old", 0o644, 0, b"old").unwrap();
        w.finish().unwrap();
        std::fs::create_dir_all(slot.join("stale")).unwrap();
        // A link where the new release puts a file: removed, never written through.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, slot.join("etc/new")).unwrap();

        let mut w = SlotWriter::update(&slot, &["bin/svc", "etc/new"]).unwrap();
        assert!(!slot.join("etc/old").exists() && !slot.join("stale").exists());
        w.chunk("bin/svc", 0o750, 0, b"aaaa").unwrap();
        w.chunk("bin/svc", 0o750, 1, b"BBBB").unwrap();
        w.chunk("etc/new", 0o644, 0, b"new").unwrap();
        assert_eq!(w.unchanged(), 4, "only the first chunk was already there");
        assert_eq!(w.finish().unwrap(), 11);
        assert_eq!(std::fs::read(slot.join("bin/svc")).unwrap(), b"aaaaBBBB");
        assert_eq!(std::fs::read(slot.join("etc/new")).unwrap(), b"new");
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert_eq!(mode_of(&slot.join("bin/svc")), 0o750);
    }

    #[test]
    fn a_resumed_file_is_cut_back_to_what_was_kept_and_later_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("a");
        let mut w = SlotWriter::create(&slot).unwrap();
        w.chunk("bin/a", 0o755, 0, b"first").unwrap();
        w.chunk("bin/b", 0o644, 0, b"0123").unwrap();
        w.chunk("bin/b", 0o644, 1, b"torn").unwrap();
        w.chunk("bin/c", 0o644, 0, b"early").unwrap();
        drop(w);
        let mut w = SlotWriter::resume(&slot, "bin/b", 0o644, 1, 4, &["bin/c"]).unwrap();
        w.chunk("bin/b", 0o644, 1, b"4567").unwrap();
        w.chunk("bin/c", 0o644, 0, b"again").unwrap();
        assert_eq!(w.finish().unwrap(), 4 + 4 + 5);
        assert_eq!(std::fs::read(slot.join("bin/a")).unwrap(), b"first");
        assert_eq!(std::fs::read(slot.join("bin/b")).unwrap(), b"01234567");
        assert_eq!(std::fs::read(slot.join("bin/c")).unwrap(), b"again");
    }

    #[test]
    fn escaping_paths_and_out_of_order_chunks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SlotWriter::create(&dir.path().join("b")).unwrap();
        for path in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(
                matches!(
                    w.chunk(path, 0o644, 0, b"x"),
                    Err(WriteError::BadPath { .. })
                ),
                "{path:?}"
            );
        }
        w.chunk("f", 0o644, 0, b"x").unwrap();
        assert!(matches!(
            w.chunk("f", 0o644, 2, b"x"),
            Err(WriteError::OutOfOrder {
                expected: 1,
                got: 2,
                ..
            })
        ));
    }
}
