//! A disk that forgets what was not synced: the power-cut harness's data partition.
//!
//! [`CrashFs`] mounts an in-memory FUSE file system in which every file and directory has two
//! versions: the one programs see, and the one a power cut would leave. A write, a truncate or
//! a chmod reaches the second only at the file's `fsync`/`fdatasync`; a create, an unlink, a
//! rename or a mkdir only at its directory's `fsync`. [`CrashFs::power_cut`] unmounts, throws
//! away everything unsynced, and mounts what is left: what LazyFS (a FUSE file system built to
//! find crash-consistency bugs) does by default, and SQLite's crash-test VFS.
//!
//! The model drops everything unsynced, whatever one file system would keep: a file created,
//! written and fsynced but whose directory was never fsynced is gone after the cut (ext4 in
//! `data=ordered` would usually keep it), and a name made durable by a directory fsync points
//! at an empty file when the file itself was never fsynced (ext4 and vfat may persist the
//! rename before the data). It is one crash outcome, not all of them: it does not tear writes
//! (all of an unsynced write is lost, never a part), does not keep some unsynced changes and
//! lose others (an unsynced name that survives with its data lost, which real file systems
//! can do, is never produced), and persists a rename across two directories one directory at
//! a time (the harness's code never renames across directories unsynced).
//!
//! [`Disk`] is the model, with no FUSE in it, so its rules are tested without root; the FUSE
//! adapter below only translates.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// File content is kept in pages shared between the two versions until written, so an fsync
/// costs a copy of the page list, not of the file.
const PAGE: usize = 16 << 10;
const ROOT: u64 = 1;
/// The size the file system says it has (`statfs`): 4 GiB in 4 KiB blocks.
const BLOCK: u64 = 4096;
const BLOCKS: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Body {
    File {
        pages: Vec<Arc<Vec<u8>>>,
        size: u64,
    },
    Dir(BTreeMap<OsString, u64>),
    Symlink(PathBuf),
    /// A socket or a FIFO: a name and nothing else.
    Special(FileType),
}

#[derive(Clone, Debug)]
struct Node {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

impl Node {
    fn kind(&self) -> FileType {
        match &self.body {
            Body::File { .. } => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
            Body::Symlink(_) => FileType::Symlink,
            Body::Special(kind) => *kind,
        }
    }

    /// What a cut leaves of a node whose name was synced but which was not: an empty file or
    /// directory with its creation's owner and mode (the inode is on the device, its data not).
    fn as_created(&self) -> Node {
        let body = match &self.body {
            Body::File { .. } => Body::File {
                pages: Vec::new(),
                size: 0,
            },
            Body::Dir(_) => Body::Dir(BTreeMap::new()),
            other => other.clone(),
        };
        Node {
            body,
            ..self.clone()
        }
    }

    /// Whether a cut would change what programs see of this node (times aside).
    fn same_as(&self, other: &Node) -> bool {
        let body = match (&self.body, &other.body) {
            (Body::File { pages: a, size: n }, Body::File { pages: b, size: m }) => {
                n == m && a == b
            }
            (Body::Dir(a), Body::Dir(b)) => a == b,
            (Body::Symlink(a), Body::Symlink(b)) => a == b,
            (Body::Special(a), Body::Special(b)) => a == b,
            _ => false,
        };
        body && self.perm == other.perm && self.uid == other.uid && self.gid == other.gid
    }
}

/// The model: what programs see (`live`) and what a power cut leaves (`synced`), by inode.
#[derive(Debug)]
pub struct Disk {
    live: HashMap<u64, Node>,
    synced: HashMap<u64, Node>,
    next: u64,
}

/// What one power cut threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Files and directories that changed since their last fsync (or were never synced).
    pub nodes: usize,
}

impl Default for Disk {
    fn default() -> Disk {
        let root = Node {
            body: Body::Dir(BTreeMap::new()),
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: SystemTime::now(),
        };
        Disk {
            live: HashMap::from([(ROOT, root.clone())]),
            synced: HashMap::from([(ROOT, root)]),
            next: ROOT + 1,
        }
    }
}

type Result<T> = std::result::Result<T, Errno>;

impl Disk {
    fn node(&self, ino: u64) -> Result<&Node> {
        self.live.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.live.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>> {
        match &self.node(dir)?.body {
            Body::Dir(entries) => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>> {
        let node = self.node_mut(dir)?;
        node.mtime = SystemTime::now();
        match &mut node.body {
            Body::Dir(entries) => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// The inode `name` in `dir` names.
    pub fn lookup(&self, dir: u64, name: &OsStr) -> Result<u64> {
        self.entries(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// The inode a path from the root names (for tests of the model).
    pub fn resolve(&self, path: &Path) -> Result<u64> {
        path.components()
            .try_fold(ROOT, |dir, part| self.lookup(dir, part.as_os_str()))
    }

    fn add(
        &mut self,
        dir: u64,
        name: &OsStr,
        body: Body,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64> {
        if self.entries(dir)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let node = Node {
            body,
            perm: perm & 0o7777,
            uid,
            gid,
            mtime: SystemTime::now(),
        };
        self.live.insert(ino, node);
        self.entries_mut(dir)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// A new empty file.
    pub fn create(&mut self, dir: u64, name: &OsStr, perm: u16) -> Result<u64> {
        let body = Body::File {
            pages: Vec::new(),
            size: 0,
        };
        self.add(dir, name, body, perm, 0, 0)
    }

    /// A new empty directory.
    pub fn mkdir(&mut self, dir: u64, name: &OsStr, perm: u16) -> Result<u64> {
        self.add(dir, name, Body::Dir(BTreeMap::new()), perm, 0, 0)
    }

    /// The bytes of `ino` in `offset..offset + size` (fewer at the end).
    pub fn read(&self, ino: u64, offset: u64, size: usize) -> Result<Vec<u8>> {
        let Body::File { pages, size: len } = &self.node(ino)?.body else {
            return Err(Errno::EISDIR);
        };
        let end = (offset + size as u64).min(*len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (page, within) = ((at / PAGE as u64) as usize, (at % PAGE as u64) as usize);
            let take = (PAGE - within).min((end - at) as usize);
            match pages.get(page) {
                Some(bytes) => out.extend_from_slice(&bytes[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            at += take as u64;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`, growing the file (with zeros) as needed.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        let node = self.node_mut(ino)?;
        node.mtime = SystemTime::now();
        let Body::File { pages, size } = &mut node.body else {
            return Err(Errno::EISDIR);
        };
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let (page, within) = ((at / PAGE as u64) as usize, (at % PAGE as u64) as usize);
            if pages.len() <= page {
                pages.resize_with(page + 1, || Arc::new(vec![0; PAGE]));
            }
            let take = (PAGE - within).min(rest.len());
            Arc::make_mut(&mut pages[page])[within..within + take].copy_from_slice(&rest[..take]);
            rest = &rest[take..];
            at += take as u64;
        }
        *size = (*size).max(offset + data.len() as u64);
        Ok(())
    }

    /// Cuts or extends (with zeros) `ino` to `len` bytes.
    pub fn truncate(&mut self, ino: u64, len: u64) -> Result<()> {
        let node = self.node_mut(ino)?;
        node.mtime = SystemTime::now();
        let Body::File { pages, size } = &mut node.body else {
            return Err(Errno::EISDIR);
        };
        let keep = len.div_ceil(PAGE as u64) as usize;
        pages.truncate(keep);
        // Past the end a page holds zeros, so that a later extension reads zeros.
        let within = (len % PAGE as u64) as usize;
        if within > 0
            && let Some(last) = pages.get_mut(keep - 1)
            && last[within..].iter().any(|b| *b != 0)
        {
            Arc::make_mut(last)[within..].fill(0);
        }
        *size = len;
        Ok(())
    }

    fn unlink(&mut self, dir: u64, name: &OsStr, want_dir: bool) -> Result<()> {
        let ino = self.lookup(dir, name)?;
        match (&self.node(ino)?.body, want_dir) {
            (Body::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::Dir(_), true) => {}
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        // The node itself stays until the next cut: a program may still hold it open.
        self.entries_mut(dir)?.remove(name);
        Ok(())
    }

    /// Moves `name` in `dir` to `to_name` in `to_dir`, over what was there (`rename(2)`).
    pub fn rename(
        &mut self,
        (dir, name): (u64, &OsStr),
        (to_dir, to_name): (u64, &OsStr),
        flags: RenameFlags,
    ) -> Result<()> {
        let ino = self.lookup(dir, name)?;
        let target = self.lookup(to_dir, to_name).ok();
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            let other = target.ok_or(Errno::ENOENT)?;
            self.entries_mut(dir)?.insert(name.to_owned(), other);
            self.entries_mut(to_dir)?.insert(to_name.to_owned(), ino);
            return Ok(());
        }
        if let Some(target) = target {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (&self.node(ino)?.body, &self.node(target)?.body) {
                (Body::Dir(_), Body::Dir(entries)) if !entries.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                (Body::Dir(_), Body::Dir(_)) => {}
                (Body::Dir(_), _) => return Err(Errno::ENOTDIR),
                (_, Body::Dir(_)) => return Err(Errno::EISDIR),
                _ => {}
            }
        }
        self.entries_mut(dir)?.remove(name);
        self.entries_mut(to_dir)?.insert(to_name.to_owned(), ino);
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file: its content, size and mode outlive a cut from now on.
    pub fn sync_file(&mut self, ino: u64) -> Result<()> {
        let node = self.node(ino)?;
        if matches!(node.body, Body::Dir(_)) {
            return self.sync_dir(ino);
        }
        self.synced.insert(ino, node.clone());
        Ok(())
    }

    /// `fsync` of a directory: its names outlive a cut from now on; a name whose node was
    /// never synced comes back as an empty node.
    pub fn sync_dir(&mut self, dir: u64) -> Result<()> {
        let node = self.node(dir)?.clone();
        let Body::Dir(entries) = &node.body else {
            return Err(Errno::ENOTDIR);
        };
        for target in entries.values() {
            if !self.synced.contains_key(target) {
                self.synced.insert(*target, self.live[target].as_created());
            }
        }
        self.synced.insert(dir, node);
        Ok(())
    }

    /// Everything synced, as if the whole disk had been flushed (`sync(1)`).
    pub fn sync_all(&mut self) {
        self.synced = self.live.clone();
    }

    /// A power cut: what programs see becomes what was synced, reachable from the root.
    pub fn power_cut(&mut self) -> Dropped {
        let mut kept = HashMap::new();
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if kept.contains_key(&ino) {
                continue;
            }
            let node = self.synced[&ino].clone();
            if let Body::Dir(entries) = &node.body {
                todo.extend(entries.values().copied());
            }
            kept.insert(ino, node);
        }
        let reachable_before = {
            let mut seen = std::collections::HashSet::new();
            let mut todo = vec![ROOT];
            while let Some(ino) = todo.pop() {
                if seen.insert(ino)
                    && let Some(Body::Dir(entries)) = self.live.get(&ino).map(|n| &n.body)
                {
                    todo.extend(entries.values().copied());
                }
            }
            seen
        };
        let nodes = reachable_before
            .iter()
            .filter(|ino| !kept.get(ino).is_some_and(|k| k.same_as(&self.live[ino])))
            .count()
            + kept
                .keys()
                .filter(|ino| !reachable_before.contains(ino))
                .count();
        self.live = kept.clone();
        self.synced = kept;
        Dropped { nodes }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr> {
        let node = self.node(ino)?;
        let size = match &node.body {
            Body::File { size, .. } => *size,
            Body::Symlink(target) => target.as_os_str().len() as u64,
            _ => 0,
        };
        let nlink = match &node.body {
            Body::Dir(_) => 2,
            _ => self
                .live
                .values()
                .filter_map(|n| match &n.body {
                    Body::Dir(entries) => Some(entries.values().filter(|i| **i == ino).count()),
                    _ => None,
                })
                .sum::<usize>() as u32,
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind: node.kind(),
            perm: node.perm,
            nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            flags: 0,
            blksize: BLOCK as u32,
        })
    }

    fn used_blocks(&self) -> u64 {
        self.live
            .values()
            .map(|n| match &n.body {
                Body::File { size, .. } => size.div_ceil(BLOCK),
                _ => 1,
            })
            .sum()
    }
}

/// Attributes and names are cached by the kernel for this long: every change goes through this
/// one mount, and a cut remounts, so nothing changes behind the kernel's back.
const TTL: Duration = Duration::from_secs(60);

struct Fuse(Arc<Mutex<Disk>>);

impl Fuse {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A panic while the lock was held leaves the model as it was after the last whole
        // operation; the harness fails on its own account then.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, reply: ReplyEntry, made: Result<u64>) {
        let disk = self.disk();
        match made.and_then(|ino| disk.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn empty(reply: ReplyEmpty, done: Result<()>) {
    match done {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// The file type in a `mode_t` (Linux's `S_IFMT` bits).
fn kind_of(mode: u32) -> Option<FileType> {
    match mode & 0o170_000 {
        0o100_000 => Some(FileType::RegularFile),
        0o140_000 => Some(FileType::Socket),
        0o010_000 => Some(FileType::NamedPipe),
        _ => None,
    }
}

impl Filesystem for Fuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.disk().lookup(parent.0, name);
        self.entry(reply, found);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.disk().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut disk = self.disk();
        let changed = (|| {
            if let Some(len) = size {
                disk.truncate(ino.0, len)?;
            }
            let node = disk.node_mut(ino.0)?;
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => node.mtime = t,
                Some(TimeOrNow::Now) => node.mtime = SystemTime::now(),
                None => {}
            }
            disk.attr(ino.0)
        })();
        match changed {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match &self.disk().node(ino.0).map(|n| n.body.clone()) {
            Ok(Body::Symlink(target)) => reply.data(target.as_os_str().as_encoded_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(*e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let body = match kind_of(mode) {
            Some(FileType::RegularFile) => Body::File {
                pages: Vec::new(),
                size: 0,
            },
            Some(kind) => Body::Special(kind),
            None => return reply.error(Errno::EPERM),
        };
        let perm = (mode & !umask) as u16;
        let made = self
            .disk()
            .add(parent.0, name, body, perm, req.uid(), req.gid());
        self.entry(reply, made);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let body = Body::Dir(BTreeMap::new());
        let perm = (mode & !umask) as u16;
        let made = self
            .disk()
            .add(parent.0, name, body, perm, req.uid(), req.gid());
        self.entry(reply, made);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.disk().unlink(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.disk().unlink(parent.0, name, true));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let body = Body::Symlink(target.to_owned());
        let made = self
            .disk()
            .add(parent.0, link_name, body, 0o777, req.uid(), req.gid());
        self.entry(reply, made);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let done = self
            .disk()
            .rename((parent.0, name), (newparent.0, newname), flags);
        empty(reply, done);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.disk().node(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.disk().read(ino.0, offset, size as usize) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.disk().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // A close is not a sync: nothing becomes durable here.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.disk().sync_file(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let disk = self.disk();
        let listing: Vec<(u64, FileType, OsString)> = match disk.entries(ino.0) {
            Ok(entries) => [
                (ino.0, FileType::Directory, OsString::from(".")),
                (ino.0, FileType::Directory, OsString::from("..")),
            ]
            .into_iter()
            .chain(entries.iter().map(|(name, child)| {
                let kind = disk.live[child].kind();
                (*child, kind, name.clone())
            }))
            .collect(),
            Err(e) => return reply.error(e),
        };
        for (i, (child, kind, name)) in listing.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.disk().sync_dir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let free = BLOCKS.saturating_sub(self.disk().used_blocks());
        reply.statfs(
            BLOCKS,
            free,
            free,
            1 << 20,
            1 << 20,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        empty(reply, self.disk().node(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(FileType::RegularFile) = kind_of(mode) else {
            return reply.error(Errno::EPERM);
        };
        let body = Body::File {
            pages: Vec::new(),
            size: 0,
        };
        let perm = (mode & !umask) as u16;
        let mut disk = self.disk();
        match disk
            .add(parent.0, name, body, perm, req.uid(), req.gid())
            .and_then(|ino| disk.attr(ino))
        {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}

/// A [`Disk`] mounted at a directory; unmounted when dropped.
pub struct CrashFs {
    disk: Arc<Mutex<Disk>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl CrashFs {
    /// Mounts an empty disk at `mountpoint` (an existing directory). Needs root (the mount
    /// syscall) and `/dev/fuse`.
    pub fn mount(mountpoint: &Path) -> io::Result<CrashFs> {
        let mut fs = CrashFs {
            disk: Arc::new(Mutex::new(Disk::default())),
            mountpoint: mountpoint.to_owned(),
            session: None,
        };
        fs.attach()?;
        Ok(fs)
    }

    /// Whether this machine can mount one (root, `/dev/fuse`); the reason when it cannot.
    pub fn unavailable() -> Option<String> {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => return Some(format!("no temporary directory: {e}")),
        };
        match CrashFs::mount(dir.path()) {
            Ok(fs) => {
                drop(fs);
                None
            }
            Err(e) => Some(format!(
                "cannot mount the FUSE crash disk ({e}): it needs root and /dev/fuse"
            )),
        }
    }

    fn attach(&mut self) -> io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("crashfs".into()),
            MountOption::Exec,
            MountOption::Dev,
            MountOption::Suid,
        ];
        self.session = Some(fuser::spawn_mount(
            Fuse(Arc::clone(&self.disk)),
            &self.mountpoint,
            &config,
        )?);
        Ok(())
    }

    fn detach(&mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.umount_and_join(),
            None => Ok(()),
        }
    }

    /// The power goes: unmounts (every program using the disk must be gone), drops every
    /// unsynced change, and mounts what is left at the same place. Processes that have been
    /// killed may take a moment to let go; anything still using the disk after 5 s is an error
    /// naming it (a process that outlived the power-off would keep writing after the cut).
    pub fn power_cut(&mut self) -> io::Result<Dropped> {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let holders = holders(&self.mountpoint);
            if holders.is_empty() {
                break;
            }
            if std::time::Instant::now() > until {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!("the disk is still in use after the power-off: {holders:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.detach().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "unmounting: {e}; in use by: {:?}",
                    holders(&self.mountpoint)
                ),
            )
        })?;
        let dropped = self
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .power_cut();
        self.attach()?;
        Ok(dropped)
    }

    /// Flushes everything, as `sync(1)` would: what the test put on the disk itself.
    pub fn sync_all(&self) {
        self.disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync_all();
    }
}

/// What uses a file system mounted at `mountpoint`, as /proc shows it: open files, working and
/// root directories, mapped files of every process, and Unix sockets bound on it. Every thread
/// is looked at, not only the leader: a killed process whose leader is already a zombie (its
/// own `fd` unreadable) still holds its files until its last thread has exited.
fn holders(mountpoint: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let under = |p: &Path| p.starts_with(mountpoint);
    let tasks = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .flat_map(|entry| {
            std::fs::read_dir(entry.path().join("task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|task| task.path())
                .collect::<Vec<_>>()
        });
    for proc in tasks {
        let pid = proc.file_name().unwrap_or_default().to_owned();
        let comm = std::fs::read_to_string(proc.join("comm")).unwrap_or_default();
        let who = format!("task {} ({})", pid.to_string_lossy(), comm.trim());
        for link in ["cwd", "root"] {
            if std::fs::read_link(proc.join(link)).is_ok_and(|p| under(&p)) {
                found.push(format!("{who}: {link}"));
            }
        }
        for fd in std::fs::read_dir(proc.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path())
                && under(&target)
            {
                found.push(format!("{who}: fd {}", target.display()));
            }
        }
        let maps = std::fs::read_to_string(proc.join("maps")).unwrap_or_default();
        let mount = mountpoint.to_string_lossy();
        if let Some(line) = maps.lines().find(|l| l.contains(mount.as_ref())) {
            found.push(format!("{who}: maps {line}"));
        }
    }
    let sockets = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    for line in sockets.lines().skip(1) {
        if let Some(path) = line.split_whitespace().nth(7)
            && under(Path::new(path))
        {
            found.push(format!("a bound Unix socket: {path}"));
        }
    }
    found.sort();
    found.dedup();
    found
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(disk: &mut Disk, path: &str, bytes: &[u8]) -> u64 {
        let path = Path::new(path);
        let dir = disk.resolve(path.parent().unwrap()).unwrap();
        let ino = disk.create(dir, path.file_name().unwrap(), 0o644).unwrap();
        disk.write(ino, 0, bytes).unwrap();
        ino
    }

    fn content(disk: &Disk, path: &str) -> Option<Vec<u8>> {
        let ino = disk.resolve(Path::new(path)).ok()?;
        Some(disk.read(ino, 0, usize::MAX >> 1).unwrap())
    }

    #[test]
    fn a_cut_drops_writes_not_synced_and_keeps_synced_ones() {
        let mut disk = Disk::default();
        let ino = file(&mut disk, "f", b"first");
        disk.sync_file(ino).unwrap();
        disk.sync_dir(ROOT).unwrap();
        disk.write(ino, 5, b", second").unwrap();
        assert_eq!(content(&disk, "f").unwrap(), b"first, second");
        assert_eq!(disk.power_cut(), Dropped { nodes: 1 });
        assert_eq!(content(&disk, "f").unwrap(), b"first");
        disk.write(ino, 5, b", third").unwrap();
        disk.sync_file(ino).unwrap();
        assert_eq!(disk.power_cut(), Dropped { nodes: 0 });
        assert_eq!(content(&disk, "f").unwrap(), b"first, third");
    }

    #[test]
    fn a_new_file_needs_its_directory_synced_and_itself_synced() {
        // Synced file, unsynced directory: the name is gone.
        let mut disk = Disk::default();
        let ino = file(&mut disk, "f", b"data");
        disk.sync_file(ino).unwrap();
        disk.power_cut();
        assert_eq!(content(&disk, "f"), None);
        // Synced directory, unsynced file: the name stays, on an empty file.
        let ino = file(&mut disk, "f", b"data");
        disk.sync_dir(ROOT).unwrap();
        disk.power_cut();
        assert_eq!(content(&disk, "f").unwrap(), b"");
        // Both: the file and its content.
        disk.write(ino, 0, b"data").unwrap();
        disk.sync_file(ino).unwrap();
        disk.power_cut();
        assert_eq!(content(&disk, "f").unwrap(), b"data");
    }

    #[test]
    fn a_rename_over_a_file_needs_the_directory_synced() {
        let mut disk = Disk::default();
        let old = file(&mut disk, "state", b"old");
        disk.sync_file(old).unwrap();
        disk.sync_dir(ROOT).unwrap();
        let new = file(&mut disk, "state.tmp", b"new");
        disk.sync_file(new).unwrap();
        disk.rename(
            (ROOT, OsStr::new("state.tmp")),
            (ROOT, OsStr::new("state")),
            RenameFlags::empty(),
        )
        .unwrap();
        assert_eq!(content(&disk, "state").unwrap(), b"new");
        disk.power_cut();
        assert_eq!(content(&disk, "state").unwrap(), b"old");
        assert_eq!(content(&disk, "state.tmp"), None);
        // The rename made durable without the new file's fsync: an empty file under the name.
        let new = file(&mut disk, "state.tmp", b"new");
        disk.rename(
            (ROOT, OsStr::new("state.tmp")),
            (ROOT, OsStr::new("state")),
            RenameFlags::empty(),
        )
        .unwrap();
        disk.sync_dir(ROOT).unwrap();
        disk.power_cut();
        assert_eq!(content(&disk, "state").unwrap(), b"");
        let _ = new;
    }

    #[test]
    fn a_directory_made_durable_keeps_only_what_was_synced_inside_it() {
        let mut disk = Disk::default();
        let dir = disk.mkdir(ROOT, OsStr::new("d"), 0o755).unwrap();
        let ino = file(&mut disk, "d/f", b"x");
        disk.sync_file(ino).unwrap();
        disk.sync_dir(ROOT).unwrap();
        disk.power_cut();
        assert_eq!(
            disk.entries(dir).unwrap().len(),
            0,
            "d/f was never named durably"
        );
        let ino = file(&mut disk, "d/f", b"x");
        disk.sync_file(ino).unwrap();
        disk.sync_dir(dir).unwrap();
        disk.power_cut();
        assert_eq!(content(&disk, "d/f").unwrap(), b"x");
    }

    #[test]
    fn truncation_and_growth_read_back_zeros_past_the_old_end() {
        let mut disk = Disk::default();
        let ino = file(&mut disk, "f", &vec![7; PAGE + 10]);
        disk.truncate(ino, 5).unwrap();
        disk.truncate(ino, PAGE as u64 + 20).unwrap();
        let bytes = content(&disk, "f").unwrap();
        assert_eq!(&bytes[..5], &[7; 5]);
        assert!(bytes[5..].iter().all(|b| *b == 0));
        assert_eq!(bytes.len(), PAGE + 20);
        disk.write(ino, 3 * PAGE as u64, b"end").unwrap();
        assert_eq!(disk.read(ino, 3 * PAGE as u64 - 2, 10).unwrap(), b"\0\0end");
    }

    #[test]
    fn an_unlinked_name_comes_back_when_the_unlink_was_not_synced() {
        let mut disk = Disk::default();
        let ino = file(&mut disk, "journal", b"mark");
        disk.sync_file(ino).unwrap();
        disk.sync_dir(ROOT).unwrap();
        disk.unlink(ROOT, OsStr::new("journal"), false).unwrap();
        assert_eq!(content(&disk, "journal"), None);
        disk.power_cut();
        assert_eq!(content(&disk, "journal").unwrap(), b"mark");
    }

    /// The mounted disk, or a skip (a failure under `CI=true`) where it cannot be mounted.
    fn mounted() -> Option<(tempfile::TempDir, CrashFs)> {
        if let Some(why) = CrashFs::unavailable() {
            crate::skip(&why);
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = CrashFs::mount(dir.path()).unwrap();
        Some((dir, fs))
    }

    #[test]
    fn through_the_mount_only_fsynced_files_in_fsynced_directories_outlive_a_cut() {
        use std::io::Write;
        let Some((dir, mut fs)) = mounted() else {
            return;
        };
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::File::open(root).unwrap().sync_all().unwrap();
        let mut kept = std::fs::File::create(root.join("d/kept")).unwrap();
        kept.write_all(b"synced").unwrap();
        kept.sync_all().unwrap();
        kept.write_all(b" and not").unwrap();
        drop(kept);
        std::fs::write(root.join("d/lost"), b"never synced").unwrap();
        std::fs::File::open(root.join("d"))
            .unwrap()
            .sync_all()
            .unwrap();
        std::fs::write(root.join("d/late"), b"named after the directory's fsync").unwrap();
        assert_eq!(
            std::fs::read(root.join("d/kept")).unwrap(),
            b"synced and not"
        );
        let dropped = fs.power_cut().unwrap();
        assert_eq!(
            dropped.nodes, 4,
            "d, d/kept, d/lost and d/late changed since their fsync"
        );
        assert_eq!(std::fs::read(root.join("d/kept")).unwrap(), b"synced");
        assert_eq!(std::fs::read(root.join("d/lost")).unwrap(), b"");
        assert!(!root.join("d/late").exists());
    }

    #[test]
    fn sqlite_on_the_mount_keeps_every_committed_row_through_a_cut() {
        let Some((dir, mut fs)) = mounted() else {
            return;
        };
        let path = dir.path().join("quotes.db");
        let open = || {
            let (db, _) = quote_store::Database::open(&path, Default::default()).unwrap();
            db.connect().unwrap()
        };
        let mut db = open();
        let before = db.count().unwrap();
        for n in 0..20 {
            let quote = quote_store::NewQuote::new(&format!("committed {n}"), "Crash disk");
            db.create(&quote.unwrap()).unwrap();
        }
        drop(db);
        let dropped = fs.power_cut().unwrap();
        assert_eq!(open().count().unwrap(), before + 20, "{dropped:?}");
    }

    #[test]
    fn directories_made_by_durable_create_dir_all_outlive_a_cut_and_plain_ones_do_not() {
        let Some((dir, mut fs)) = mounted() else {
            return;
        };
        let root = dir.path();
        std::fs::create_dir_all(root.join("plain/a/b")).unwrap();
        durable::create_dir_all(&root.join("durable/a/b")).unwrap();
        durable::create_dir_all(&root.join("durable/a/c")).unwrap();
        fs.power_cut().unwrap();
        // The root was fsynced for `durable`, and that kept the name `plain` too: only what is
        // below it was lost.
        assert!(root.join("plain").is_dir());
        assert!(!root.join("plain/a").exists());
        assert!(root.join("durable/a/b").is_dir());
        assert!(root.join("durable/a/c").is_dir());
    }
}
