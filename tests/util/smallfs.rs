//! Real small file systems for the disk-fault tests: a size-limited tmpfs or a loop-mounted ext4 image,
//! mounted on a fresh temp dir, to put a gateway's state directory on. A test can then fill it
//! ([`SmallFs::fill`], [`SmallFs::fill_leaving`]: writes fail with ENOSPC) or, on ext4, shut it down
//! ([`SmallFs::shutdown`]: every read, write and fsync fails with EIO) and mount it again at the same
//! path ([`SmallFs::remount`]).
//!
//! This module owns its mounts, the ext4 image files and the filler files. Dropping a [`SmallFs`]
//! unmounts it lazily (`umount -l`: the gateway may still hold files open on it); the kernel detaches
//! the loop device once the last of those files is closed (`mount -o loop` sets the loop device's
//! autoclear flag; we never `losetup -d` a device by name, which could hit another test's device), and
//! the temp dirs (mount point, images) are removed. Mounts whose test process was killed (SIGKILL) stay
//! behind: the tmpfs ones are listed in `/proc/mounts` as `fieldgate-smallfs`.
//!
//! Mounting needs root (CI runs the tests as root) and Linux with glibc (for `libc`). Where it is not
//! possible the constructors print `SKIPPED (<reason>): ...` to stderr and return `None`; the test then
//! returns early.
//!
//! There is deliberately no read-only remount of a tmpfs: `mount -o remount,ro` fails with EBUSY while
//! any file on it is open for writing (checked on Linux 6.18), which is exactly when a test wants it.
//! An ext4 [`SmallFs::shutdown`] is the fault that works under open files.

use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// `errno` of a write to a full file system (`io::Error::raw_os_error`).
pub const ENOSPC: i32 = 28;
/// `errno` of any I/O on a shut-down file system.
pub const EIO: i32 = 5;

/// What [`SmallFs::fill`] writes at once into its big file (then smaller pieces for the rest).
const CHUNK: usize = 64 * 1024;
/// Zeros to write: real data blocks on both file systems (neither makes holes of written zeros).
static ZEROS: [u8; CHUNK] = [0; CHUNK];
/// Upper bound on the small files [`SmallFs::fill`] creates after its big file (a guard: on a full
/// file system the first or second one already fails).
const MAX_SMALL_FILES: usize = 10_000;

/// A mounted small file system on a temp dir; unmounted (lazily) on drop.
pub struct SmallFs {
    /// The mount point.
    mount: TempDir,
    /// Whether `mount` currently has our file system on it (false only after a failed remount).
    mounted: bool,
    /// tmpfs or ext4 (with its image).
    kind: Kind,
}

/// The two kinds of [`SmallFs`].
enum Kind {
    Tmpfs,
    Ext4(Ext4),
}

/// The image behind an ext4 [`SmallFs`].
struct Ext4 {
    /// Holds the image files.
    images: TempDir,
    /// The image mounted now.
    image: PathBuf,
    /// Remounts so far (names the image copies: `image.0`, `image.1`, ...).
    generation: u32,
}

/// Mount a tmpfs of `bytes` (rounded up to whole pages by the kernel) on a fresh temp dir.
///
/// `None` (after a `SKIPPED` line on stderr) where it cannot be mounted: not root, not Linux with glibc,
/// no `mount`, mount refused.
pub fn tmpfs(bytes: u64) -> Option<SmallFs> {
    let what = format!("a {bytes}-byte tmpfs");
    can_mount(&what)?;
    let mount = tempfile::tempdir().expect("temp dir for a tmpfs mount point");
    let options = format!("size={bytes},mode=0755");
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "tmpfs", "-o", &options, "fieldgate-smallfs"])
        .arg(mount.path());
    mount_or_skip(&what, cmd)?;
    Some(SmallFs {
        mount,
        mounted: true,
        kind: Kind::Tmpfs,
    })
}

/// Make an ext4 image of `bytes` in a temp dir and mount it (`-o loop`) on a fresh temp dir.
///
/// `mkfs.ext4 -q -F -m 0`: no blocks reserved for root (the tests run as root, and with a reserve a
/// "full" file system would still take root's writes). Small images get 1 KiB blocks and lose space to
/// metadata: of 8 MiB about 6.3 MiB are free (inode tables, a 1 MiB journal); below 2 MiB mkfs makes no
/// journal at all, and it refuses 64 KiB and less. Use [`SmallFs::free_bytes`], not `bytes`, for what
/// is usable. Takes about 10-20 ms (mkfs and mount) on the CI machine.
///
/// `None` (after a `SKIPPED` line on stderr) where it cannot be mounted: not root, not Linux with glibc,
/// no loop devices, no `mkfs.ext4`, mount refused. Panics if `mkfs.ext4` rejects the size.
pub fn ext4(bytes: u64) -> Option<SmallFs> {
    let what = format!("a {bytes}-byte ext4 image");
    can_mount(&what)?;
    if !Path::new("/dev/loop-control").exists() {
        return skip(
            "no loop device",
            format!("cannot mount {what}: /dev/loop-control is missing"),
        );
    }
    let images = tempfile::tempdir().expect("temp dir for an ext4 image");
    let image = images.path().join("image.0");
    File::create(&image)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("creating the {bytes}-byte image {}: {e}", image.display()));
    // Inode tables and journal written now, not by a kernel thread after the mount.
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(&image)
        .output();
    match mkfs {
        Err(e) => return skip("no mkfs.ext4", format!("cannot make {what}: mkfs.ext4: {e}")),
        Ok(out) => assert!(
            out.status.success(),
            "mkfs.ext4 of {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
    let mount = tempfile::tempdir().expect("temp dir for an ext4 mount point");
    mount_or_skip(&what, mount_loop(&image, mount.path()))?;
    let ext4 = Ext4 {
        images,
        image,
        generation: 0,
    };
    Some(SmallFs {
        mount,
        mounted: true,
        kind: Kind::Ext4(ext4),
    })
}

impl SmallFs {
    /// The mount point: put the state directory below it (the filler files live in it directly).
    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Bytes an unprivileged write could still use: statvfs `f_bavail * f_frsize` (ext4 keeps a few
    /// blocks out of this for itself even with `-m 0`).
    pub fn free_bytes(&self) -> u64 {
        self.statvfs().free
    }

    /// The file system's block size (`f_frsize`): 4096 on tmpfs, 1024 on small ext4 images.
    pub fn block_size(&self) -> u64 {
        self.statvfs().block
    }

    /// The loop device behind an ext4 file system (from `/proc/self/mountinfo`; it changes with
    /// [`SmallFs::remount`]); `None` for tmpfs.
    pub fn loop_device(&self) -> Option<PathBuf> {
        if matches!(self.kind, Kind::Tmpfs) {
            return None;
        }
        let info = fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
        let at = self.path().to_str().expect("temp dir paths are UTF-8");
        // `id parent dev root MOUNT_POINT options [optional...] - fstype SOURCE super-options`; the
        // last mount on the same point is the visible one.
        info.lines()
            .rev()
            .filter(|line| line.split(' ').nth(4) == Some(at))
            .find_map(|line| line.split(" - ").nth(1)?.split(' ').nth(1).map(PathBuf::from))
    }

    /// Fill the file system completely: the file `filler` in 64 KiB chunks (each fsynced), then
    /// smaller pieces down to single bytes, until ENOSPC; then small files `filler.<n>` of one block
    /// each until creating or writing one fails with ENOSPC (blocks the big file could not take, e.g.
    /// for want of an extent block). Afterwards [`SmallFs::free_bytes`] is 0 and any write that needs
    /// a new block fails with ENOSPC. Inodes are not exhausted (a tmpfs has millions): creating an empty
    /// file or overwriting within an allocated block may still succeed.
    ///
    /// Panics on any error other than ENOSPC.
    pub fn fill(&self) -> Filler {
        let mut filler = Filler {
            dir: self.path().to_path_buf(),
            files: Vec::new(),
        };
        let mut file = filler.create("filler").expect("creating the filler file");
        for piece in [CHUNK, 4096, 512, 1] {
            while write_synced(&mut file, &ZEROS[..piece]) {}
        }
        // What the last, failed write got in (a short write before the ENOSPC) on disk too.
        sync_unless_full(&file);
        let block = usize::try_from(self.block_size())
            .expect("block size fits usize")
            .min(CHUNK);
        for n in 0..MAX_SMALL_FILES {
            let Some(mut small) = filler.create(&format!("filler.{n}")) else {
                break;
            };
            if !write_synced(&mut small, &ZEROS[..block]) {
                break;
            }
        }
        filler.sync_dir();
        filler
    }

    /// Fill the file system until about `bytes` are left free: afterwards
    /// `bytes - a few blocks <= free_bytes() < bytes + block_size()` (ext4 may spend a block of the
    /// remainder on metadata). For "below the gateway's reserve, but not zero". Writes nothing if
    /// less than `bytes` are free already. Panics on any error other than ENOSPC.
    pub fn fill_leaving(&self, bytes: u64) -> Filler {
        let block = self.block_size();
        let mut filler = Filler {
            dir: self.path().to_path_buf(),
            files: Vec::new(),
        };
        let mut file = filler.create("filler").expect("creating the filler file");
        let mut last_free = u64::MAX;
        loop {
            let free = self.free_bytes();
            // Stop when less than a block is left above `bytes`, or when a write took nothing.
            if free < bytes + block || free >= last_free {
                break;
            }
            last_free = free;
            let len = (free - bytes).min(CHUNK as u64) / block * block;
            let len = usize::try_from(len).expect("at most CHUNK");
            if !write_synced(&mut file, &ZEROS[..len]) {
                sync_unless_full(&file);
                break;
            }
        }
        filler.sync_dir();
        filler
    }

    /// Shut the file system down (ext4 only): `FS_IOC_SHUTDOWN` with `FS_GOING_DOWN_NOLOGFLUSH` on the
    /// mount point, like a disk that died: from now on every read, write, fsync, open and create on it
    /// fails with EIO, through old and new handles alike; its journal is not flushed. What was fsynced
    /// before is on the image; [`SmallFs::remount`] brings it back.
    ///
    /// Panics on a tmpfs (which has no such ioctl) or if the ioctl fails.
    pub fn shutdown(&self) {
        assert!(
            matches!(self.kind, Kind::Ext4(_)),
            "SmallFs::shutdown needs an ext4 SmallFs (tmpfs has no FS_IOC_SHUTDOWN)"
        );
        sys::shutdown(self.path()).unwrap_or_else(|e| panic!("FS_IOC_SHUTDOWN on {}: {e}", self.path().display()));
    }

    /// Mount the file system again at the same path (ext4 only; normally after [`SmallFs::shutdown`]):
    /// `umount -l` the mount point, copy the image as it is now, mount the copy with a new loop device.
    /// A process that (re)opens files by path gets a healthy file system with whatever was fsynced
    /// before (the journal is replayed, as after a power cut); handles it opened before keep pointing at
    /// the old, dead file system and keep failing with EIO.
    ///
    /// Why a copy: the old file system lives on (with the old loop device) as long as a handle on it is
    /// open, and `mount -o loop` of the same image would reuse that loop device and so that dead
    /// superblock; the copy also keeps the dead one from ever writing to what the new one mounts.
    ///
    /// Panics on a tmpfs or if unmounting or mounting fails.
    pub fn remount(&mut self) {
        let Kind::Ext4(ext4) = &mut self.kind else {
            panic!("SmallFs::remount needs an ext4 SmallFs")
        };
        let at = self.mount.path();
        if self.mounted {
            umount_lazy(at).unwrap_or_else(|e| panic!("remount: unmounting {}: {e}", at.display()));
            self.mounted = false;
        }
        ext4.generation += 1;
        let next = ext4.images.path().join(format!("image.{}", ext4.generation));
        fs::copy(&ext4.image, &next)
            .unwrap_or_else(|e| panic!("remount: copying {} to {}: {e}", ext4.image.display(), next.display()));
        // The old loop device keeps the old image's inode until the old file system is gone.
        let _ = fs::remove_file(&ext4.image);
        ext4.image = next;
        if let Err(e) = run(mount_loop(&ext4.image, at)) {
            panic!("remount: mounting {} at {}: {e}", ext4.image.display(), at.display());
        }
        self.mounted = true;
    }

    /// statvfs of the mount point; panics if it fails.
    fn statvfs(&self) -> sys::Statvfs {
        sys::statvfs(self.path()).unwrap_or_else(|e| panic!("statvfs {}: {e}", self.path().display()))
    }
}

impl Drop for SmallFs {
    /// `umount -l` (files may still be open on it; a loop device goes when they are closed); if that
    /// fails, the mount point is left in place (with a line on stderr) rather than emptied.
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if let Err(e) = umount_lazy(self.mount.path()) {
            eprintln!("smallfs: leaving {} mounted: {e}", self.mount.path().display());
            self.mount.disable_cleanup(true);
        }
    }
}

/// The files [`SmallFs::fill`] or [`SmallFs::fill_leaving`] wrote; they stay until [`Filler::release`]
/// (or until the [`SmallFs`] goes).
#[must_use = "the space comes back only with Filler::release (or with the SmallFs)"]
pub struct Filler {
    /// The mount point the files are in.
    dir: PathBuf,
    /// The files, big one first.
    files: Vec<PathBuf>,
}

impl Filler {
    /// Bytes written into the filler files.
    pub fn bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Truncate and delete the filler files and fsync the directory: the space is free again when this
    /// returns. Panics if that fails (on a shut-down file system: [`SmallFs::remount`] first).
    ///
    /// Truncated first because unlinking alone frees nothing while any descriptor of the file is open,
    /// and a process another test thread is spawning holds copies of all of ours until its `exec`
    /// (seen: `free_bytes()` still 0 right after the unlink, in one run of 25).
    pub fn release(self) {
        for file in &self.files {
            let truncated = OpenOptions::new().write(true).open(file).and_then(|f| {
                f.set_len(0)?;
                f.sync_all()
            });
            match truncated.and_then(|()| fs::remove_file(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("releasing the filler: truncating and removing {}: {e}", file.display()),
            }
        }
        self.sync_dir();
    }

    /// Create `name` in the directory and remember it; `None` on ENOSPC, panics on other errors.
    fn create(&mut self, name: &str) -> Option<File> {
        let path = self.dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => {
                self.files.push(path);
                Some(file)
            }
            Err(e) if is_full(&e) => None,
            Err(e) => panic!("creating {}: {e}", path.display()),
        }
    }

    /// fsync the directory, so the files' creation or removal is durable.
    fn sync_dir(&self) {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .unwrap_or_else(|e| panic!("fsync of {}: {e}", self.dir.display()));
    }
}

/// Append `data` to `file` and fsync it: true if all of it is on disk, false on ENOSPC (a part may
/// have been written); panics on other errors.
fn write_synced(file: &mut File, data: &[u8]) -> bool {
    match file.write_all(data).and_then(|()| file.sync_all()) {
        Ok(()) => true,
        Err(e) if is_full(&e) => false,
        Err(e) => panic!("filling: {e}"),
    }
}

/// fsync `file`; ENOSPC is fine (the space is full), other errors panic.
fn sync_unless_full(file: &File) {
    match file.sync_all() {
        Ok(()) => {}
        Err(e) if is_full(&e) => {}
        Err(e) => panic!("filling: fsync: {e}"),
    }
}

/// ENOSPC (or a write that took nothing).
fn is_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(ENOSPC) || e.kind() == io::ErrorKind::WriteZero
}

/// `mount -t ext4 -o loop IMAGE AT`.
fn mount_loop(image: &Path, at: &Path) -> Command {
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "ext4", "-o", "loop"]).arg(image).arg(at);
    cmd
}

/// `umount -l AT`.
fn umount_lazy(at: &Path) -> Result<(), String> {
    let mut cmd = Command::new("umount");
    cmd.arg("-l").arg(at);
    run(cmd)
}

/// Run `cmd`; its stderr (or why it did not run) as the error.
fn run(mut cmd: Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Run a `mount` command; `None` after a `SKIPPED` line if it does not run or fails.
fn mount_or_skip(what: &str, cmd: Command) -> Option<()> {
    match run(cmd) {
        Ok(()) => Some(()),
        Err(e) => skip("mount refused", format!("cannot mount {what}: {e}")),
    }
}

/// `None` after a `SKIPPED` line if this process cannot mount at all (not Linux with glibc, not root).
fn can_mount(what: &str) -> Option<()> {
    if !sys::SUPPORTED {
        return skip("not Linux with glibc", format!("cannot mount {what}"));
    }
    let euid = sys::euid();
    if euid != 0 {
        return skip("not root", format!("cannot mount {what} as uid {euid}"));
    }
    Some(())
}

/// Print `SKIPPED (<reason>): <test>: <detail>` to stderr; `None`.
fn skip<T>(reason: &str, detail: impl Display) -> Option<T> {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    eprintln!("SKIPPED ({reason}): {test}: {detail}");
    None
}

/// The system calls (through `libc`, a dependency on Linux with glibc only).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod sys {
    use std::ffi::CString;
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// Mounting is possible here (given root).
    pub const SUPPORTED: bool = true;

    /// `_IOR('X', 125, __u32)` from `<linux/fs.h>`.
    const FS_IOC_SHUTDOWN: libc::Ioctl = 0x8004_587D;
    /// Shut down without flushing the journal (`<linux/fs.h>`).
    const FS_GOING_DOWN_NOLOGFLUSH: u32 = 2;

    /// Free space and block size of a file system.
    pub struct Statvfs {
        /// `f_bavail * f_frsize`.
        pub free: u64,
        /// `f_frsize`.
        pub block: u64,
    }

    /// The effective uid.
    pub fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// statvfs(3) of `path`.
    pub fn statvfs(path: &Path) -> io::Result<Statvfs> {
        let c_path = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: statvfs is plain old data; all zeros is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c_path` is NUL-terminated and `st` is a writable statvfs, both alive for the call.
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Statvfs {
            free: st.f_bavail as u64 * st.f_frsize as u64,
            block: st.f_frsize as u64,
        })
    }

    /// `FS_IOC_SHUTDOWN` (`FS_GOING_DOWN_NOLOGFLUSH`) on the file system mounted at `mount_point`.
    pub fn shutdown(mount_point: &Path) -> io::Result<()> {
        let dir = File::open(mount_point)?;
        let flag = FS_GOING_DOWN_NOLOGFLUSH;
        // SAFETY: FS_IOC_SHUTDOWN reads one u32 through the pointer, which points at `flag`; `dir` is
        // an open descriptor; both are alive for the call.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SHUTDOWN, &flag as *const u32) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Elsewhere nothing is mounted (the constructors skip), so these are never reached.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod sys {
    use std::io;
    use std::path::Path;

    /// Mounting is not possible here.
    pub const SUPPORTED: bool = false;

    /// Free space and block size of a file system.
    pub struct Statvfs {
        /// `f_bavail * f_frsize`.
        pub free: u64,
        /// `f_frsize`.
        pub block: u64,
    }

    /// Unknown here.
    pub fn euid() -> u32 {
        u32::MAX
    }

    /// Unsupported here.
    pub fn statvfs(_path: &Path) -> io::Result<Statvfs> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Unsupported here.
    pub fn shutdown(_mount_point: &Path) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}
