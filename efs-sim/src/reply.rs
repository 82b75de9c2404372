//! What goes back to the kernel: reply payloads, the [`Replier`] trait that
//! lets one generic worker answer every kind of request, directory listings
//! (readdir and readdirplus), and conversion of backing attributes into FUSE
//! attributes.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr,
};

use crate::fs::Core;
use crate::inodes::Inode;
use crate::sys;

/// Directory entries handed to one readdir reply at most (the reply stops
/// earlier when the kernel's buffer is full).
const READDIR_CHUNK: usize = 4096;

/// A directory entry with its attributes, as lookup-type replies carry it.
pub struct Entry {
    pub attr: FileAttr,
    pub ttl: Duration,
}

/// How a worker answers the kernel for one kind of reply.
pub trait Replier<T>: Send + 'static {
    fn ok(self, value: T);
    fn err(self, errno: Errno);
}

impl Replier<Entry> for ReplyEntry {
    fn ok(self, e: Entry) {
        self.entry(&e.ttl, &e.attr, Generation(0));
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<Entry> for ReplyAttr {
    fn ok(self, e: Entry) {
        self.attr(&e.ttl, &e.attr);
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<()> for ReplyEmpty {
    fn ok(self, (): ()) {
        ReplyEmpty::ok(self);
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<Vec<u8>> for ReplyData {
    fn ok(self, data: Vec<u8>) {
        self.data(&data);
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<u64> for ReplyOpen {
    fn ok(self, fh: u64) {
        self.opened(FileHandle(fh), FopenFlags::empty());
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<u32> for ReplyWrite {
    fn ok(self, n: u32) {
        self.written(n);
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<(Entry, u64)> for ReplyCreate {
    fn ok(self, (e, fh): (Entry, u64)) {
        self.created(&e.ttl, &e.attr, Generation(0), FileHandle(fh), FopenFlags::empty());
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<libc::statvfs> for ReplyStatfs {
    fn ok(self, s: libc::statvfs) {
        self.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

/// An xattr answer: only the size (when asked with size 0), or the data.
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

impl Replier<Xattr> for ReplyXattr {
    fn ok(self, x: Xattr) {
        match x {
            Xattr::Size(n) => self.size(n),
            Xattr::Data(d) => self.data(&d),
        }
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

impl Replier<i64> for ReplyLseek {
    fn ok(self, off: i64) {
        self.offset(off);
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

/// A slice of a directory snapshot, starting at index `start`.
pub struct Listing {
    pub entries: Arc<Vec<sys::DirEntry>>,
    pub start: usize,
}

impl Replier<Listing> for ReplyDirectory {
    fn ok(mut self, l: Listing) {
        let end = (l.start + READDIR_CHUNK).min(l.entries.len());
        for (i, e) in l.entries[l.start..end].iter().enumerate() {
            let offset = (l.start + i + 1) as u64;
            let name = OsStr::from_bytes(&e.name);
            if self.add(INodeNo(e.ino), offset, dtype_kind(e.kind), name) {
                break;
            }
        }
        ReplyDirectory::ok(self);
    }
    fn err(self, errno: Errno) {
        self.error(errno);
    }
}

/// readdirplus: entries are looked up one by one while the reply has room, so
/// every entry the kernel receives is counted exactly once.
pub struct PlusReply {
    pub reply: ReplyDirectoryPlus,
    pub core: Arc<Core>,
    pub dir: Arc<Inode>,
}

impl Replier<Listing> for PlusReply {
    fn ok(mut self, l: Listing) {
        let end = (l.start + READDIR_CHUNK).min(l.entries.len());
        for (i, e) in l.entries[l.start..end].iter().enumerate() {
            let offset = (l.start + i + 1) as u64;
            let name = OsStr::from_bytes(&e.name);
            if e.name == b"." || e.name == b".." {
                // The kernel does not instantiate dot entries; no lookup is counted.
                let attr = dot_attr(e.ino);
                if self
                    .reply
                    .add(INodeNo(e.ino), offset, name, &Duration::ZERO, &attr, Generation(0))
                {
                    break;
                }
                continue;
            }
            let Ok(entry) = self.core.lookup_entry(&self.dir, name) else {
                // Gone since the snapshot: leave it out.
                continue;
            };
            let nodeid = entry.attr.ino.0;
            if self
                .reply
                .add(INodeNo(nodeid), offset, name, &entry.ttl, &entry.attr, Generation(0))
            {
                self.core.inodes.forget(nodeid, 1);
                break;
            }
        }
        self.reply.ok();
    }
    fn err(self, errno: Errno) {
        self.reply.error(errno);
    }
}

fn dtype_kind(t: u8) -> FileType {
    match t {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub fn mode_kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

pub fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

pub fn timespec_of(t: SystemTime) -> (i64, i64) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
        Err(e) => {
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = i64::from(d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            (sec, nsec)
        }
    }
}

pub fn file_attr(nodeid: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(nodeid),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: mode_kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

pub fn xattr_answer(size: u32, n: usize, data: Vec<u8>) -> io::Result<Xattr> {
    if size == 0 {
        Ok(Xattr::Size(
            u32::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        ))
    } else if n > size as usize {
        Err(io::Error::from_raw_os_error(libc::ERANGE))
    } else {
        Ok(Xattr::Data(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for (s, n) in [(0i64, 0i64), (1_700_000_000, 123_456_789), (-5, 250_000_000)] {
            assert_eq!(timespec_of(system_time(s, n)), (s, n));
        }
    }

    #[test]
    fn xattr_sizes() {
        assert!(matches!(xattr_answer(0, 7, vec![]), Ok(Xattr::Size(7))));
        assert!(xattr_answer(4, 7, vec![0; 4]).is_err());
        assert!(matches!(xattr_answer(8, 7, vec![0; 7]), Ok(Xattr::Data(d)) if d.len() == 7));
    }
}
