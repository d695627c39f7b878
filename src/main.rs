//! The `fieldgate` binary: parse the command line and hand over to [`fieldgate::cli`].

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    trim::start();
    fieldgate::cli::main()
}

/// Hand memory that glibc's malloc keeps after it was freed back to the system.
///
/// Draining a large backlog frees about as much as it allocates (sled reads each page of the queue
/// into memory, the sender's acknowledgements free it again), but glibc keeps freed memory in its
/// per-thread arenas and between live chunks: the gateway's RSS grew with the number of records
/// drained while its live heap stayed flat (160 MiB RSS after draining
/// 1,000,000 records, live heap ~32 MiB). `malloc_trim(0)` returns every whole free page of every
/// arena (~1 ms a call with a 1,000,000-record backlog, measured). It is called only when the RSS has
/// grown by [`GROWTH`] since the last call, so a gateway whose memory is steady (polling, no backlog)
/// pays one read of `/proc/self/status` per [`EVERY`] and nothing else.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod trim {
    use std::time::Duration;

    /// How often the RSS is looked at.
    const EVERY: Duration = Duration::from_millis(250);
    /// Growth of the RSS (KiB) over its lowest value since the last trim that triggers a trim.
    const GROWTH: u64 = 2 * 1024;

    /// Start the thread (a failure to start it only costs memory).
    pub fn start() {
        let _ = std::thread::Builder::new()
            .name("malloc-trim".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                let mut low = rss_kib().unwrap_or(0);
                loop {
                    std::thread::sleep(EVERY);
                    let Some(now) = rss_kib() else {
                        return;
                    };
                    low = low.min(now);
                    if now >= low + GROWTH {
                        // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc takes
                        // each arena's lock while it walks it, like any malloc or free.
                        unsafe {
                            libc::malloc_trim(0);
                        }
                        low = rss_kib().unwrap_or(now);
                    }
                }
            });
    }

    /// VmRSS of this process in KiB.
    fn rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}
