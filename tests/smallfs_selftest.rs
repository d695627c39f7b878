//! The disk-fault helper [`crate::util::smallfs`] against the kernel: a filled tmpfs or ext4 refuses
//! writes with ENOSPC until the filler is released; `fill_leaving` leaves about what it was asked to;
//! a shut-down ext4 fails writes and fsyncs with EIO, and after a remount the same path shows what was
//! fsynced before and takes new writes, while the old handle stays dead. Skipped (a `SKIPPED` line)
//! where nothing can be mounted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::util::smallfs::{self, SmallFs, EIO, ENOSPC};
use crate::util::wait_until_sync;

const MIB: u64 = 1024 * 1024;

/// Create `path` and write `data` to it, fsynced.
fn write_new(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// The errno of a result that must be an error.
fn errno<T>(what: &str, result: io::Result<T>) -> i32 {
    match result {
        Ok(_) => panic!("{what}: succeeded, expected an error"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("{what}: {e} has no errno")),
    }
}

/// Mount with `mount`, printing how long it took.
fn timed(what: &str, mount: impl FnOnce() -> Option<SmallFs>) -> Option<SmallFs> {
    let start = Instant::now();
    let fs = mount()?;
    eprintln!(
        "{what}: mounted in {:?}, {} bytes free",
        start.elapsed(),
        fs.free_bytes()
    );
    Some(fs)
}

/// Full → ENOSPC, released → writable again; on `fs`, with a state directory made before the fill.
fn fill_then_release(fs: &SmallFs) {
    let state = fs.path().join("state");
    fs::create_dir(&state).expect("state dir");
    let before = fs.free_bytes();

    let start = Instant::now();
    let filler = fs.fill();
    eprintln!("filled {} bytes in {:?}", filler.bytes(), start.elapsed());
    assert_eq!(fs.free_bytes(), 0, "free bytes after fill");
    assert_eq!(
        errno("4 KiB write on a full fs", write_new(&state.join("record"), &[1; 4096])),
        ENOSPC
    );
    assert_eq!(
        errno("1-byte write on a full fs", write_new(&state.join("tiny"), b"x")),
        ENOSPC
    );

    filler.release();
    let after = fs.free_bytes();
    // ext4 may keep a block or two (a directory that grew) of what it had.
    assert!(
        after + 4 * fs.block_size() >= before,
        "free after release {after}, before the fill {before}"
    );
    write_new(&state.join("record"), &[1; 4096]).expect("write after release");
    assert_eq!(fs::read(state.join("record")).expect("read back").len(), 4096);
}

/// `fill_leaving(keep)` on `fs`: about `keep` left, half of it writable, twice of it not.
fn fill_leaving_keeps(fs: &SmallFs, keep: u64) {
    let block = fs.block_size();
    let filler = fs.fill_leaving(keep);
    let free = fs.free_bytes();
    eprintln!("fill_leaving({keep}): {free} bytes free, {} written", filler.bytes());
    assert!(free < keep + block, "{free} free, asked to leave {keep}");
    assert!(free + 4 * block >= keep, "{free} free, asked to leave {keep}");
    let half = usize::try_from(keep / 2).expect("small");
    write_new(&fs.path().join("half"), &vec![1; half]).expect("writing half of what was left");
    let twice = usize::try_from(keep * 2).expect("small");
    assert_eq!(
        errno(
            "writing twice what was left",
            write_new(&fs.path().join("twice"), &vec![1; twice])
        ),
        ENOSPC
    );
    filler.release();
}

/// The `/sys/block/loopN/loop/backing_file` of a loop device (`None` once it is detached).
fn backing_file(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    let path = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
    fs::read_to_string(path).ok().map(|s| s.trim_end().to_string())
}

#[test]
fn a_filled_tmpfs_refuses_writes_with_enospc_until_released() {
    let Some(fs) = timed("tmpfs 4 MiB", || smallfs::tmpfs(4 * MIB)) else {
        return;
    };
    assert_eq!(fs.free_bytes(), 4 * MIB);
    fill_then_release(&fs);
}

#[test]
fn a_filled_ext4_refuses_writes_with_enospc_until_released() {
    let Some(fs) = timed("ext4 8 MiB", || smallfs::ext4(8 * MIB)) else {
        return;
    };
    fill_then_release(&fs);
}

#[test]
fn fill_leaving_leaves_about_what_it_was_asked_to() {
    if let Some(fs) = timed("tmpfs 4 MiB", || smallfs::tmpfs(4 * MIB)) {
        fill_leaving_keeps(&fs, 256 * 1024);
    }
    if let Some(fs) = timed("ext4 8 MiB", || smallfs::ext4(8 * MIB)) {
        fill_leaving_keeps(&fs, 256 * 1024);
    }
}

#[test]
fn a_shut_down_ext4_fails_with_eio_and_is_healthy_again_after_a_remount() {
    let Some(mut fs) = timed("ext4 8 MiB", || smallfs::ext4(8 * MIB)) else {
        return;
    };
    let state = fs.path().join("state");
    fs::create_dir(&state).expect("state dir");
    fs::File::open(fs.path())
        .and_then(|d| d.sync_all())
        .expect("fsync of the mount point");
    let record = state.join("record");
    let mut open = File::create(&record).expect("create");
    open.write_all(b"fsynced before the shutdown\n").expect("write");
    open.sync_all().expect("fsync");
    File::open(&state)
        .and_then(|d| d.sync_all())
        .expect("fsync of the state dir");
    open.write_all(b"written, never fsynced\n").expect("write");

    fs.shutdown();
    assert_eq!(errno("write after shutdown", open.write_all(b"lost\n")), EIO);
    assert_eq!(errno("fsync after shutdown", open.sync_all()), EIO);
    assert_eq!(errno("read after shutdown", fs::read(&record)), EIO);
    assert_eq!(errno("create after shutdown", File::create(state.join("new"))), EIO);

    let dead = fs.loop_device().expect("ext4 has a loop device");
    let dead_backing = backing_file(&dead).expect("the loop device is attached");
    let start = Instant::now();
    fs.remount();
    eprintln!("remounted in {:?}", start.elapsed());
    let live = fs.loop_device().expect("ext4 has a loop device");
    assert_ne!(live, dead, "the remount uses a new loop device");
    let live_backing = backing_file(&live).expect("the new loop device is attached");

    let mut content = String::new();
    File::open(&record)
        .and_then(|mut f| f.read_to_string(&mut content))
        .expect("read after remount");
    assert!(
        content.starts_with("fsynced before the shutdown\n"),
        "after the remount: {content:?}"
    );
    let mut append = OpenOptions::new()
        .append(true)
        .open(&record)
        .expect("open after remount");
    append
        .write_all(b"after the remount\n")
        .and_then(|()| append.sync_all())
        .expect("write after remount");
    assert!(fs::read_to_string(&record)
        .expect("read")
        .ends_with("after the remount\n"));
    write_new(&state.join("new"), b"new file").expect("new file after remount");
    // The handle from before the shutdown still points at the dead file system.
    assert_eq!(errno("old handle after remount", open.write_all(b"still dead\n")), EIO);

    // Drop: both loop devices go once nothing is open on their file systems (the dead one was kept
    // by `open`). Another test may take over a freed loopN: compare what it is attached to.
    drop(append);
    drop(open);
    drop(fs);
    for (device, backing) in [(dead, dead_backing), (live, live_backing)] {
        wait_until_sync(&format!("{} detached from {backing}", device.display()), || {
            backing_file(&device).is_none_or(|now| !now.starts_with(&backing))
        });
    }
}
