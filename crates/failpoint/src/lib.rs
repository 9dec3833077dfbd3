//! Fault injection for the power-cut harness (the `enabled` feature, which each crate's
//! `failpoints` feature turns on; without it every function here is an empty inline).
//! `QUOTE_EDGE_FAILPOINT=NAME:N` stops the process the Nth time `NAME` is reached: no
//! unwinding, no destructor, no flush, as close to a power cut as a process can get without
//! losing its page cache. `QUOTE_EDGE_FAILPOINT=slot.bytes:K` aborts once K bytes of release data
//! have been written to a slot (the write is cut at K).
//!
//! How a point stops the process: a process that is not the init of its PID namespace freezes
//! (SIGSTOP: every thread at once, nothing more written) after creating the file named by
//! `QUOTE_EDGE_FAILPOINT_HALT`, and the harness, seeing that file, cuts the power. That is how a
//! child of the supervisor (the release's database tool, mid-`VACUUM INTO`) takes the whole
//! device down: killing itself would only fail one command. The supervisor, PID 1 of the
//! harness's namespace, where SIGSTOP is ignored, kills itself, which takes the namespace down.
//! Without the variable every process kills itself.
//!
//! `QUOTE_EDGE_FAILPOINT_RECORD=FILE` is the counting mode the power-cut harness starts with:
//! every point reached appends a line `NAME BYTES` to FILE (BYTES: release bytes passed to the
//! slot writer so far), so that the harness finds the points and how often each is reached
//! instead of listing them by hand, and knows where each journal mark fell. A point reached in
//! a child process is counted from 1 in that process.
//!
//! `QUOTE_EDGE_FAILPOINT_SKIP_SYNC=NAME` leaves out the fsync named NAME (see [`sync`]).
//!
//! [`inherited`] is what a process passes on to the children it starts with a clean
//! environment, so that their points take part.

/// Marks a point of the update path (after or before a write, fsync or rename).
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "enabled")]
    imp::hit(name);
    #[cfg(not(feature = "enabled"))]
    let _ = name;
}

/// Runs `fsync`, an fsync of the update path named `name`, unless a failpoints build was told
/// to leave this one out (`QUOTE_EDGE_FAILPOINT_SKIP_SYNC=NAME`): the switch with which the
/// power-cut harness, whose disk drops what was not synced, proves that it notices a missing
/// fsync. Names are `area.synced` (a file) and `area.dir_synced` (a directory).
#[inline]
pub fn sync(name: &str, fsync: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    #[cfg(feature = "enabled")]
    if imp::skip_sync(name) {
        return Ok(());
    }
    #[cfg(not(feature = "enabled"))]
    let _ = name;
    fsync()
}

/// For a write of `len` bytes after `done` bytes: how many to write before the abort, if the
/// configured byte offset falls inside this write.
#[inline]
pub fn cut_bytes(done: u64, len: usize) -> Option<usize> {
    #[cfg(feature = "enabled")]
    return imp::cut_bytes(done, len);
    #[cfg(not(feature = "enabled"))]
    {
        let _ = (done, len);
        None
    }
}

/// The fail point variables of this process (`QUOTE_EDGE_FAILPOINT*`) in an enabled build, for a
/// child started with a clean environment; none otherwise.
pub fn inherited() -> impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> {
    #[cfg(feature = "enabled")]
    let vars: Vec<_> = std::env::vars_os()
        .filter(|(k, _)| {
            k.to_str()
                .is_some_and(|k| k.starts_with("QUOTE_EDGE_FAILPOINT"))
        })
        .collect();
    #[cfg(not(feature = "enabled"))]
    let vars = Vec::new();
    vars.into_iter()
}

/// Ends the process now, as `kill -9` would: SIGKILL cannot be caught or delayed (not even
/// by an emulator running the process, where `abort()` can hang in a threaded program).
pub fn abort() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    std::process::abort()
}

#[cfg(feature = "enabled")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn config() -> Option<&'static (String, u64)> {
        static CONFIG: OnceLock<Option<(String, u64)>> = OnceLock::new();
        CONFIG
            .get_or_init(|| {
                let value = std::env::var("QUOTE_EDGE_FAILPOINT").ok()?;
                let (name, n) = value.rsplit_once(':')?;
                Some((name.to_owned(), n.parse().ok()?))
            })
            .as_ref()
    }

    static HITS: AtomicU64 = AtomicU64::new(0);
    /// Release bytes passed to the slot writer so far, as `cut_bytes` last saw them.
    static BYTES: AtomicU64 = AtomicU64::new(0);

    fn record_file() -> Option<&'static std::path::Path> {
        static RECORD: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
        RECORD
            .get_or_init(|| std::env::var_os("QUOTE_EDGE_FAILPOINT_RECORD").map(Into::into))
            .as_deref()
    }

    pub fn hit(name: &str) {
        if let Some(path) = record_file() {
            use std::io::Write;
            // One write per line on an O_APPEND file: lines of concurrent points never mix.
            let line = format!("{name} {}\n", BYTES.load(Ordering::SeqCst));
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                let _ = writeln!(
                    std::io::stderr(),
                    "failpoint record {}: {e}",
                    path.display()
                );
                super::abort();
            }
        }
        if let Some((point, n)) = config()
            && point == name
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
        {
            tracing_free_note(name);
            halt();
            super::abort();
        }
    }

    pub fn skip_sync(name: &str) -> bool {
        static SKIP: OnceLock<Option<String>> = OnceLock::new();
        SKIP.get_or_init(|| std::env::var("QUOTE_EDGE_FAILPOINT_SKIP_SYNC").ok())
            .as_deref()
            == Some(name)
    }

    pub fn cut_bytes(done: u64, len: usize) -> Option<usize> {
        BYTES.store(done + len as u64, Ordering::SeqCst);
        let (point, k) = config()?;
        (point == "slot.bytes" && done <= *k && *k < done + len as u64)
            .then(|| (*k - done) as usize)
    }

    /// Freezes the process after saying so in `QUOTE_EDGE_FAILPOINT_HALT`'s file; returns
    /// only where SIGSTOP is ignored (the init of a PID namespace) or no file is asked for.
    fn halt() {
        let Some(file) = std::env::var_os("QUOTE_EDGE_FAILPOINT_HALT") else {
            return;
        };
        if rustix::process::getpid().is_init() {
            return;
        }
        if let Err(e) = std::fs::write(&file, b"") {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "failpoint halt file: {e}");
            return;
        }
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
    }

    fn tracing_free_note(name: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "failpoint {name}: aborting");
    }
}
