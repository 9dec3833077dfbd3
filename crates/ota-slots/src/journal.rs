//! The install journal: how far an install got, durably, so that after a power cut or a
//! pulled stick the agent resumes instead of starting over.
//!
//! `<ota>/install.journal` holds two fixed 128-byte records written alternately (a record is
//! never overwritten in place while it is the newest), each with a generation number and a
//! CRC-32; the newest valid record wins. A torn write destroys at most the record being written,
//! leaving the previous one. A record is written only after the slot data it covers was
//! fsynced, so everything before its position can be trusted to be on disk (the agent still
//! re-hashes it before resuming).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::SlotName;

const MAGIC: &[u8; 8] = b"QEJRNL01";
const RECORD: usize = 128;
const BODY: usize = 104;

/// A durable point of an install: the next chunk to write and where its frame is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The bundle's manifest digest (64 hex characters).
    pub digest: String,
    pub slot: SlotName,
    pub file: u32,
    pub chunk: u32,
    pub offset: u64,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    generation: u64,
    /// Whether the journal's name is known to be durable (its directory fsynced since this
    /// value was made): a record in a file whose name a cut can take away keeps nothing.
    named: bool,
}

impl Journal {
    pub fn new(dir: &Path) -> Journal {
        let mut journal = Journal {
            path: dir.join("install.journal"),
            generation: 0,
            named: false,
        };
        journal.generation = journal.records().map_or(0, |(g, _)| g);
        journal
    }

    /// The newest valid mark, if any.
    pub fn read(&self) -> Option<Mark> {
        self.records().map(|(_, mark)| mark)
    }

    fn records(&self) -> Option<(u64, Mark)> {
        let mut bytes = Vec::new();
        File::open(&self.path)
            .ok()?
            .take(2 * RECORD as u64)
            .read_to_end(&mut bytes)
            .ok()?;
        bytes
            .chunks(RECORD)
            .filter_map(decode)
            .max_by_key(|(generation, _)| *generation)
    }

    /// Writes `mark` as the newest record and fsyncs it (and, the first time, the directory,
    /// so that the file's name outlives a cut too).
    pub fn record(&mut self, mark: &Mark) -> std::io::Result<()> {
        self.generation += 1;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)?;
        file.seek(SeekFrom::Start((self.generation % 2) * RECORD as u64))?;
        file.write_all(&encode(self.generation, mark))?;
        failpoint::sync("journal.synced", || file.sync_data())?;
        if !self.named {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            failpoint::sync("journal.dir_synced", || File::open(dir)?.sync_all())?;
            self.named = true;
        }
        failpoint::hit("journal.recorded");
        Ok(())
    }

    /// Forgets the install (it finished, or will not be resumed).
    pub fn clear(&mut self) -> std::io::Result<()> {
        self.named = false;
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn encode(generation: u64, mark: &Mark) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&generation.to_le_bytes());
    r[16] = match mark.slot {
        SlotName::A => b'a',
        SlotName::B => b'b',
    };
    r[24..28].copy_from_slice(&mark.file.to_le_bytes());
    r[28..32].copy_from_slice(&mark.chunk.to_le_bytes());
    r[32..40].copy_from_slice(&mark.offset.to_le_bytes());
    let digest = mark.digest.as_bytes();
    let n = digest.len().min(64);
    r[40..40 + n].copy_from_slice(&digest[..n]);
    let crc = crc32fast::hash(&r[..BODY]);
    r[BODY..BODY + 4].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8]) -> Option<(u64, Mark)> {
    if r.len() != RECORD || &r[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(r[BODY..BODY + 4].try_into().ok()?);
    if crc != crc32fast::hash(&r[..BODY]) {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    let slot = match r[16] {
        b'a' => SlotName::A,
        b'b' => SlotName::B,
        _ => return None,
    };
    let digest = std::str::from_utf8(&r[40..104])
        .ok()?
        .trim_end_matches('\0')
        .to_owned();
    Some((
        u64_at(8),
        Mark {
            digest,
            slot,
            file: u32_at(24),
            chunk: u32_at(28),
            offset: u64_at(32),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(chunk: u32) -> Mark {
        Mark {
            digest: "ab".repeat(32),
            slot: SlotName::B,
            file: 1,
            chunk,
            offset: 4096 * u64::from(chunk),
        }
    }

    #[test]
    fn the_newest_valid_record_wins_and_a_torn_one_falls_back_to_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::new(dir.path());
        assert_eq!(journal.read(), None);
        journal.record(&mark(1)).unwrap();
        journal.record(&mark(2)).unwrap();
        assert_eq!(journal.read(), Some(mark(2)));
        // Tear the newest record (generation 2 lives in slot 0): the previous one is used.
        let path = dir.path().join("install.journal");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Journal::new(dir.path()).read(), Some(mark(1)));
        // A reopened journal continues the generations: its next record is the newest.
        let mut again = Journal::new(dir.path());
        again.record(&mark(3)).unwrap();
        assert_eq!(Journal::new(dir.path()).read(), Some(mark(3)));
        again.clear().unwrap();
        assert_eq!(Journal::new(dir.path()).read(), None);
    }

    #[test]
    fn garbage_is_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("install.journal"), vec![0x5a; 300]).unwrap();
        assert_eq!(Journal::new(dir.path()).read(), None);
    }
}
