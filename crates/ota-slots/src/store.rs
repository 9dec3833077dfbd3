//! The state file: read, and replaced atomically (temporary file in the same directory, fsync,
//! rename, fsync of the directory), so that after a power cut at any instant the file holds
//! either the old state or the new one. All file operations go through [`Fs`] so that tests can
//! fail each of them in turn.

use std::path::{Path, PathBuf};

pub use durable::Fs;
use durable::StdFs;

use crate::State;

/// The real file system for the state file, with the power-cut harness's fail points after
/// each step (`state.written`, `state.synced`, `state.renamed`, `state.dir_synced`).
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

/// The real file system for the files kept beside a slot (its manifest and signed head), with
/// fail points `kept.written`, `kept.synced`, `kept.renamed`, `kept.dir_synced`.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeptFs;

/// Each step of an atomic replace, then its fail point.
macro_rules! fs_with_points {
    ($fs:ty, hit($written:literal), hit($synced:literal), hit($renamed:literal), hit($dir_synced:literal)) => {
        impl Fs for $fs {
            fn write_new(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
                StdFs.write_new(path, bytes)?;
                failpoint::hit($written);
                Ok(())
            }
            fn sync_file(&mut self, path: &Path) -> std::io::Result<()> {
                failpoint::sync($synced, || StdFs.sync_file(path))?;
                failpoint::hit($synced);
                Ok(())
            }
            fn rename(&mut self, from: &Path, to: &Path) -> std::io::Result<()> {
                StdFs.rename(from, to)?;
                failpoint::hit($renamed);
                Ok(())
            }
            fn sync_dir(&mut self, dir: &Path) -> std::io::Result<()> {
                failpoint::sync($dir_synced, || StdFs.sync_dir(dir))?;
                failpoint::hit($dir_synced);
                Ok(())
            }
        }
    };
}

// Written as `hit("NAME")` so that the power-cut harness, which reads every `hit("…")` under
// crates/, finds them: it fails when a point in the code is never reached.
fs_with_points!(
    RealFs,
    hit("state.written"),
    hit("state.synced"),
    hit("state.renamed"),
    hit("state.dir_synced")
);
fs_with_points!(
    KeptFs,
    hit("kept.written"),
    hit("kept.synced"),
    hit("kept.renamed"),
    hit("kept.dir_synced")
);

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the OTA state {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the OTA state {path} is not valid ({reason}); it was left in place for inspection")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "cannot save the OTA state {path} ({step}): {source}; the previous state is still in force"
    )]
    Save {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Largest state file read (a few kilobytes in practice).
const MAX_STATE_BYTES: u64 = 1 << 20;

/// `<dir>/state.json`.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The saved state, or the factory state when there is none yet. A leftover temporary file
    /// from an interrupted save is ignored: the rename never happened, so the old state holds.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::factory()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        if meta.len() > MAX_STATE_BYTES {
            return Err(StateError::Corrupt {
                path,
                reason: format!("{} bytes, more than any state", meta.len()),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        let state: State = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.format != 1 {
            return Err(StateError::Corrupt {
                path,
                reason: format!("format {} is not 1", state.format),
            });
        }
        Ok(state)
    }

    /// Saves `state` with the next generation number; returns what was saved. On error the
    /// previous state is still the one on disk.
    pub fn save(&self, fs: &mut impl Fs, state: &State) -> Result<State, StateError> {
        let mut next = state.clone();
        next.generation += 1;
        let bytes = serde_json::to_vec_pretty(&next).expect("state serialises");
        let path = self.path();
        std::fs::create_dir_all(&self.dir).map_err(|source| StateError::Save {
            path: path.clone(),
            step: "create directory",
            source,
        })?;
        // `state.json.tmp` beside it: a leftover from a cut save is never read (see `load`).
        durable::replace(fs, &path, &bytes).map_err(|e| StateError::Save {
            path: e.path,
            step: e.step.as_str(),
            source: e.source,
        })?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Release, SlotName};

    fn trial_from(state: &State) -> State {
        let (s, slot) = state.begin_install("d1", "1.1", 2).unwrap();
        s.finish_install(slot).unwrap().switch(slot).unwrap()
    }

    #[test]
    fn a_fresh_device_is_on_the_factory_release() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), State::factory());
    }

    #[test]
    fn a_cut_at_every_step_of_a_save_leaves_the_old_or_the_new_state() {
        for n in 0..=4 {
            let dir = tempfile::tempdir().unwrap();
            let file = StateFile::new(dir.path());
            let saved_old = file.save(&mut RealFs, &State::factory()).unwrap();
            let new = trial_from(&saved_old);
            let result = file.save(&mut durable::CutAt::new(RealFs, n), &new);
            let loaded = file.load().expect("the state file is never half written");
            if n < 3 {
                // Before the rename: the old state holds.
                assert!(result.is_err());
                assert_eq!(loaded, saved_old, "cut at step {n}");
            } else {
                // The rename happened; only the directory sync failed or nothing did.
                assert_eq!(loaded.active, Release::Slot(SlotName::A), "cut at step {n}");
                assert_eq!(loaded.generation, saved_old.generation + 1);
            }
        }
    }

    #[test]
    fn generations_increase_with_every_save() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        let a = file.save(&mut RealFs, &State::factory()).unwrap();
        let b = file.save(&mut RealFs, &a).unwrap();
        assert_eq!((a.generation, b.generation), (1, 2));
        assert_eq!(file.load().unwrap(), b);
    }

    #[test]
    fn a_corrupt_state_file_is_named_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        std::fs::write(file.path(), b"{\"format\":1,\"active\":").unwrap();
        let err = file.load().unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("state.json"));
        assert!(
            file.path().exists(),
            "a corrupt state is evidence: never deleted"
        );
    }
}
