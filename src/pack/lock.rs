//! One writer per pack. `adapt` holds an exclusive advisory lock on `PACK/.lock` for its whole
//! run; readers (`export`, `report`) hold a shared one while they read. The locks are the
//! operating system's (`flock`), so they vanish with the process that held them: a run killed
//! with SIGKILL never leaves a stale lock behind. The writer records its process id and
//! command line in the file, so whoever is refused can say who holds the pack.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::{Pack, PackError};

/// How long to wait for a pack another process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Fail at once, naming the holder.
    No,
    /// Block until the holder is done.
    Yes,
}

/// A held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct PackLock {
    file: File,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exclusive,
    Shared,
}

impl Pack {
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(".lock")
    }

    /// Takes the pack for writing (creating its directory if needed).
    pub fn lock_exclusive(&self, wait: Wait) -> Result<PackLock, PackError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| PackError::Write { path: self.dir.clone(), source })?;
        let mut lock = self.take(Kind::Exclusive, wait)?;
        // Who holds the pack, for the message a refused process prints.
        let me = format!("{} {}\n", std::process::id(), command_line());
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            f.write_all(me.as_bytes())?;
            f.sync_all()
        };
        write(&mut lock.file).map_err(|source| PackError::Write { path: self.lock_path(), source })?;
        Ok(lock)
    }

    /// Takes the pack for reading: any number of readers, no writer. A directory without a
    /// lock file (a pack copied elsewhere, a read-only mount) is read without one.
    pub fn lock_shared(&self, wait: Wait) -> Result<Option<PackLock>, PackError> {
        if !self.lock_path().is_file() {
            return Ok(None);
        }
        self.take(Kind::Shared, wait).map(Some)
    }

    fn take(&self, kind: Kind, wait: Wait) -> Result<PackLock, PackError> {
        let path = self.lock_path();
        let mut file = open(&path, kind).map_err(|source| PackError::Write { path: path.clone(), source })?;
        let attempt = match (kind, wait) {
            (Kind::Exclusive, Wait::No) => file.try_lock(),
            (Kind::Shared, Wait::No) => file.try_lock_shared(),
            (Kind::Exclusive, Wait::Yes) => file.lock().map_err(TryLockError::Error),
            (Kind::Shared, Wait::Yes) => file.lock_shared().map_err(TryLockError::Error),
        };
        match attempt {
            Ok(()) => Ok(PackLock { file }),
            Err(TryLockError::WouldBlock) => {
                Err(PackError::Busy { path: self.dir.clone(), holder: holder(&mut file, kind) })
            }
            Err(TryLockError::Error(source)) => Err(PackError::Write { path, source }),
        }
    }
}

fn open(path: &Path, kind: Kind) -> std::io::Result<File> {
    match kind {
        Kind::Exclusive => OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path),
        // A reader may not be allowed to write the pack; reading is enough for a shared lock.
        Kind::Shared => File::open(path),
    }
}

/// Names the process that holds the lock, as far as it can be known.
fn holder(file: &mut File, wanted: Kind) -> String {
    let mut text = String::new();
    let recorded = file.read_to_string(&mut text).ok().and(text.lines().next().map(str::to_string));
    let alive = |pid: &str| Path::new("/proc").join(pid).exists() || !Path::new("/proc/self").exists();
    match recorded.as_deref().and_then(|l| l.split_once(' ')) {
        Some((pid, cmd)) if alive(pid) && pid != std::process::id().to_string() => {
            format!("process {pid} ({cmd}) is writing it")
        }
        // The recorded writer is gone, so the holders are readers.
        _ if wanted == Kind::Exclusive => "another process is reading it".to_string(),
        _ => "another process is writing it".to_string(),
    }
}

fn command_line() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|p| Path::new(&p).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(p))
        .unwrap_or_default();
    std::iter::once(program).chain(args).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_many_readers() {
        let dir = tempfile::tempdir().unwrap();
        let pack = Pack::new(&dir.path().join("p"));
        let w = pack.lock_exclusive(Wait::No).unwrap();
        let refused = pack.lock_exclusive(Wait::No).unwrap_err();
        assert!(matches!(refused, PackError::Busy { .. }), "{refused}");
        // Our own process holds it; the message still says it is taken.
        assert!(format!("{refused}").contains("p"));
        assert!(matches!(pack.lock_shared(Wait::No), Err(PackError::Busy { .. })));
        drop(w);
        let r1 = pack.lock_shared(Wait::No).unwrap();
        let r2 = pack.lock_shared(Wait::No).unwrap();
        let refused = pack.lock_exclusive(Wait::No).unwrap_err();
        assert!(format!("{refused:#}").contains("reading"), "{refused}");
        drop((r1, r2));
        pack.lock_exclusive(Wait::No).unwrap();
    }

    #[test]
    fn a_pack_without_a_lock_file_is_read_without_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Pack::new(dir.path()).lock_shared(Wait::No).unwrap().is_none());
    }
}
