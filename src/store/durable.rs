//! Making a sled database folder durable after `flush()`: which files and folders to `fsync`.
//!
//! `flush()` writes sled's log with `sync_file_range`, which neither flushes the disk's cache nor
//! the file's metadata, so every sync must end with an `fsync` (see shared/notes/sled-durability.md).
//!
//! Why it is sparing: on ext4 *every* `fsync` costs a flush of the disk's cache, even on a file with
//! nothing to write, so fsyncing all four or five files and folders of the database on each sync
//! costs four or five cache flushes where one carries the data; listing a folder costs more than it
//! looks (`read_dir` allocates and frees a 32 KiB buffer, and glibc then consolidates its free
//! lists); and opening the folder and its log by path on every sync costs as much as the rest of the
//! bookkeeping.
//!
//! What sled 0.34.7 writes, read from its source:
//! - `db`: the log. Rewritten in place all the time: it is fsynced on **every** sync.
//! - `conf`: written once, when the database is created; never rewritten.
//! - `snap.*`: each snapshot is a new file, fsynced by sled itself, then renamed into place; old
//!   ones are deleted. So its *folder* changes, the file's content is already durable.
//! - `blobs/*`: one new file per large value (over ~128 KiB), never rewritten.
//!
//! So besides `db`, a file needs an fsync only when it is new or changed (its inode, size or times
//! differ from when we last fsynced it), and a folder only when its list of entries changed. Each
//! fsync (but that of `db`, which is always due) is remembered only after it succeeded, so a failed
//! or concurrent sync never hides work from the next one. The first sync of a process fsyncs
//! everything.
//!
//! A folder whose own stamp (inode, mtime, ctime) is unchanged had no entry added, removed or
//! renamed, so it is listed again only when its stamp moves; its files are then only the log (always
//! fsynced) and files sled never rewrites in place. The stamp is trusted only if it was already [`RACY`] old when
//! recorded: a change within the same tick of the file system's clock could leave it as it was (the
//! "racy timestamp" of git's index).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How old a folder's stamp must be to stand for "no entry changed" (module docs).
const RACY: Duration = Duration::from_secs(2);

/// The file sled rewrites in place (its log): fsynced on every sync.
const LOG_FILE: &str = "db";

/// The folder of sled's large values, made on the first one.
const BLOBS: &str = "blobs";

/// The identity and last change of a file, as `stat` tells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// What was last made durable in one database folder (shared by every clone of the store).
#[derive(Debug, Default)]
pub(crate) struct Synced {
    seen: Mutex<Seen>,
    /// fsync calls made, for the tests.
    fsyncs: AtomicU64,
    /// Folder listings made, for the tests.
    listings: AtomicU64,
    /// Handles of the database folder last synced and of its log, kept while the folder stays quiet
    /// (module docs).
    kept: Mutex<Option<Kept>>,
}

/// Open handles of one database folder.
#[derive(Debug)]
struct Kept {
    dir: PathBuf,
    folder: Arc<std::fs::File>,
    log: Option<Arc<std::fs::File>>,
}

#[derive(Debug, Default)]
struct Seen {
    files: HashMap<PathBuf, Stamp>,
    folders: HashMap<PathBuf, Vec<(OsString, u64)>>,
    /// Folders listed and synced when their stamp was this, and old enough to trust.
    quiet: HashMap<PathBuf, Stamp>,
}

impl Seen {
    /// Whether `folder`'s last listing had an entry `name`.
    fn has_entry(&self, folder: &Path, name: &str) -> bool {
        self.folders
            .get(folder)
            .is_some_and(|l| l.iter().any(|(n, _)| n.as_os_str() == name))
    }
}

/// A file or folder that could not be fsynced.
#[derive(Debug)]
pub(crate) struct SyncFailed {
    /// The file or folder.
    pub(crate) path: PathBuf,
    /// What `open` or `fsync` said.
    pub(crate) source: std::io::Error,
}

impl Synced {
    /// Fsync `dir`'s log always, and every other file of `dir` and `dir/blobs` and the two folders
    /// when they changed since the last successful fsync.
    pub(crate) fn sync(&self, dir: &Path) -> Result<(), SyncFailed> {
        if self.sync_folder(dir, true)? {
            self.sync_folder(&dir.join(BLOBS), false)?;
        }
        Ok(())
    }

    /// Make `folder` durable (`is_db`: the database folder, whose log is always fsynced). Returns
    /// whether `blobs` may hold something to sync.
    fn sync_folder(&self, folder: &Path, is_db: bool) -> Result<bool, SyncFailed> {
        // A folder that does not exist (no blobs yet) has nothing to make durable. The database
        // folder is looked at through a kept handle: no path to walk on every sync.
        let meta = if is_db {
            self.kept_folder(folder).and_then(|f| f.metadata())
        } else {
            std::fs::metadata(folder)
        };
        let Ok(meta) = meta else {
            return Ok(is_db);
        };
        let stamp = Stamp::of(&meta);
        if self.seen().quiet.get(folder) == Some(&stamp) {
            if !is_db {
                return Ok(false);
            }
            self.fsync_log(folder)?;
            // No entry changed since the folder was listed: `blobs` only if it was there.
            return Ok(self.seen().has_entry(folder, BLOBS));
        }
        if is_db {
            // Entries changed: the log is fsynced by name below and opened anew when quiet again.
            if let Some(kept) = self.kept().as_mut() {
                kept.log = None;
            }
        }
        self.listings.fetch_add(1, Ordering::Relaxed);
        let Ok(entries) = std::fs::read_dir(folder) else {
            return Ok(is_db);
        };
        let mut listing = Vec::new();
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue; // gone since the listing (an old snapshot sled deleted)
            };
            listing.push((entry.file_name(), meta.ino()));
            if meta.is_file() {
                self.sync_file(&entry.path(), entry.file_name() == LOG_FILE, Stamp::of(&meta))?;
            }
        }
        listing.sort();
        if self.seen().folders.get(folder) != Some(&listing) {
            self.fsync(folder)?;
            self.seen().folders.insert(folder.to_path_buf(), listing);
        }
        // Taken before the listing: a change since moves the stamp, and the next sync lists again.
        // The one wall-clock comparison of the crate, and the right clock for it: the folder's mtime is
        // written by this same clock, and the question is whether the file system's clock has left
        // that mtime's tick by the time of this listing (so that a later change gets another mtime).
        // A step backwards makes the age negative (not trusted: listed again); a step forwards trusts
        // a stamp only with a listing made after the step, and every change after the step gets a
        // post-step mtime. A monotonic clock cannot answer it: it has no relation to file times.
        let old = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age >= RACY);
        let mut seen = self.seen();
        if old {
            seen.quiet.insert(folder.to_path_buf(), stamp);
        } else {
            seen.quiet.remove(folder);
        }
        Ok(is_db)
    }

    /// Folder listings made so far.
    #[cfg(test)]
    pub(crate) fn listings(&self) -> u64 {
        self.listings.load(Ordering::Relaxed)
    }

    fn sync_file(&self, path: &Path, always: bool, stamp: Stamp) -> Result<(), SyncFailed> {
        if !always && self.seen().files.get(path) == Some(&stamp) {
            return Ok(());
        }
        match self.fsync(path) {
            Ok(()) => {}
            // Deleted since the listing: sled only deletes what it no longer needs, and the folder's
            // new listing is fsynced below.
            Err(e) if !always && e.source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if !always {
            // The stamp was taken before the fsync: a change in between makes the next sync see a
            // different stamp and fsync again.
            self.seen().files.insert(path.to_path_buf(), stamp);
        }
        Ok(())
    }

    /// fsync calls made so far.
    #[cfg(test)]
    pub(crate) fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    fn fsync(&self, path: &Path) -> Result<(), SyncFailed> {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|source| SyncFailed {
                path: path.to_path_buf(),
                source,
            })
    }

    /// The kept handle of the database folder `dir` (opened if there is none, or it is of another
    /// folder).
    fn kept_folder(&self, dir: &Path) -> std::io::Result<Arc<std::fs::File>> {
        let mut kept = self.kept();
        match &*kept {
            Some(k) if k.dir == dir => Ok(k.folder.clone()),
            _ => {
                let folder = Arc::new(std::fs::File::open(dir)?);
                *kept = Some(Kept {
                    dir: dir.to_path_buf(),
                    folder: folder.clone(),
                    log: None,
                });
                Ok(folder)
            }
        }
    }

    /// fsync the log of `dir` through the kept handle, opening it if there is none. After a failure
    /// the handle is dropped, so the next sync opens the file again.
    fn fsync_log(&self, dir: &Path) -> Result<(), SyncFailed> {
        let failed = |source| SyncFailed {
            path: dir.join(LOG_FILE),
            source,
        };
        let file = {
            let mut kept = self.kept();
            match kept.as_mut() {
                Some(k) if k.dir == dir => match &k.log {
                    Some(log) => log.clone(),
                    None => {
                        let log = Arc::new(std::fs::File::open(dir.join(LOG_FILE)).map_err(failed)?);
                        k.log = Some(log.clone());
                        log
                    }
                },
                // Not kept (only after a folder's handle failed): by name, as any file.
                _ => return self.fsync(&dir.join(LOG_FILE)),
            }
        };
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        // Outside the lock: concurrent syncs (recorder, sender) may share one journal commit.
        file.sync_all().map_err(|e| {
            if let Some(kept) = self.kept().as_mut() {
                kept.log = None;
            }
            failed(e)
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Option<Kept>> {
        // Only cached handles: after a panic elsewhere they are still valid.
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // The map only caches what was synced; after a panic elsewhere it is still a valid cache.
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fsyncs made by one more sync of `dir`.
    fn fsyncs_of_a_sync(s: &Synced, dir: &Path) -> u64 {
        let before = s.fsyncs();
        s.sync(dir).unwrap();
        s.fsyncs() - before
    }

    #[test]
    fn the_first_sync_covers_everything_then_only_the_log_and_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("db"), b"log").unwrap();
        std::fs::write(d.join("conf"), b"conf").unwrap();
        std::fs::create_dir(d.join("blobs")).unwrap();
        let s = Synced::default();
        assert_eq!(fsyncs_of_a_sync(&s, d), 4, "db, conf, the folder, blobs/");
        assert_eq!(fsyncs_of_a_sync(&s, d), 1, "nothing changed: the log only");
        std::fs::write(d.join("db"), b"log, longer").unwrap();
        assert_eq!(
            fsyncs_of_a_sync(&s, d),
            1,
            "the log changes all the time: still only the log"
        );

        // A new snapshot: the file and the folder. A new blob: the file and blobs/.
        std::fs::write(d.join("snap.00000001"), b"snap").unwrap();
        assert_eq!(fsyncs_of_a_sync(&s, d), 3);
        std::fs::write(d.join("blobs").join("7"), b"blob").unwrap();
        assert_eq!(fsyncs_of_a_sync(&s, d), 3);
        assert_eq!(fsyncs_of_a_sync(&s, d), 1);

        // A file rewritten (size) and one deleted: that file, and the folder's new listing.
        std::fs::write(d.join("conf"), b"conf, rewritten").unwrap();
        std::fs::remove_file(d.join("snap.00000001")).unwrap();
        assert_eq!(fsyncs_of_a_sync(&s, d), 3, "db, conf, the folder");
        assert_eq!(fsyncs_of_a_sync(&s, d), 1);

        // Another process (a restart) starts with nothing known: everything again.
        assert_eq!(
            fsyncs_of_a_sync(&Synced::default(), d),
            5,
            "db, conf, the folder, blobs/7, blobs/"
        );
    }

    #[test]
    fn a_folder_unchanged_for_a_while_is_not_listed_again_until_an_entry_changes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("db"), b"log").unwrap();
        std::fs::write(d.join("conf"), b"conf").unwrap();
        let age = |t: u64| {
            let then = SystemTime::now() - Duration::from_secs(t);
            std::fs::File::open(d).unwrap().set_modified(then).unwrap();
        };
        age(10);
        let s = Synced::default();
        assert_eq!(fsyncs_of_a_sync(&s, d), 3, "db, conf, the folder");
        let listed = s.listings();
        std::fs::write(d.join("db"), b"log, longer").unwrap();
        assert_eq!(fsyncs_of_a_sync(&s, d), 1, "the log");
        assert_eq!(s.listings(), listed, "an old, unchanged folder is not listed");

        // A new snapshot moves the folder's stamp: listed, the file and the folder fsynced.
        std::fs::write(d.join("snap.00000001"), b"snap").unwrap();
        assert_eq!(fsyncs_of_a_sync(&s, d), 3, "db, the snapshot, the folder");
        assert_eq!(s.listings(), listed + 1);
        // Changed just now: not trusted yet, so listed again (and nothing more to fsync).
        assert_eq!(fsyncs_of_a_sync(&s, d), 1);
        assert_eq!(s.listings(), listed + 2);
        // A stamp that was recent when recorded is never trusted: a rename in the same clock tick
        // could leave it as it is.
        age(10);
        assert_eq!(fsyncs_of_a_sync(&s, d), 1);
        std::fs::rename(d.join("snap.00000001"), d.join("snap.00000002")).unwrap();
        age(10);
        assert_eq!(
            fsyncs_of_a_sync(&s, d),
            3,
            "its stamp moved (ctime): db, the snapshot under its new name, the folder"
        );
        assert_eq!(s.listings(), listed + 4);
    }

    #[test]
    fn a_folder_that_does_not_exist_has_nothing_to_sync() {
        let s = Synced::default();
        assert_eq!(fsyncs_of_a_sync(&s, Path::new("/nonexistent/fieldgate-test")), 0);
    }

    /// The inode of the kept log handle, if any.
    fn kept_log(s: &Synced) -> Option<u64> {
        s.kept()
            .as_ref()
            .and_then(|k| k.log.as_ref())
            .and_then(|f| f.metadata().ok())
            .map(|m| m.ino())
    }

    #[test]
    fn the_kept_log_handle_follows_the_folder_and_blobs_made_later_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("db"), b"log").unwrap();
        let age = || {
            let then = SystemTime::now() - Duration::from_secs(10);
            std::fs::File::open(d).unwrap().set_modified(then).unwrap();
        };
        let ino = |name: &str| std::fs::metadata(d.join(name)).unwrap().ino();
        age();
        let s = Synced::default();
        assert_eq!(fsyncs_of_a_sync(&s, d), 2, "db, the folder");
        assert_eq!(kept_log(&s), None, "fsynced by name while listing");
        assert_eq!(fsyncs_of_a_sync(&s, d), 1, "the log");
        assert_eq!(kept_log(&s), Some(ino("db")));

        // A log put in place by rename (sled never does it) is a new entry: listed, fsynced by name,
        // and the old handle let go.
        std::fs::write(d.join("db.new"), b"another log").unwrap();
        std::fs::rename(d.join("db.new"), d.join("db")).unwrap();
        age();
        assert_eq!(fsyncs_of_a_sync(&s, d), 2, "the new db, the folder");
        assert_eq!(kept_log(&s), None);
        assert_eq!(fsyncs_of_a_sync(&s, d), 1);
        assert_eq!(kept_log(&s), Some(ino("db")), "the new log's handle");

        // `blobs` made after the folder went quiet: the folder's stamp moved, so both are listed.
        std::fs::create_dir(d.join("blobs")).unwrap();
        std::fs::write(d.join("blobs").join("1"), b"large value").unwrap();
        assert_eq!(fsyncs_of_a_sync(&s, d), 4, "db, the folder, the blob, blobs");
    }
}
