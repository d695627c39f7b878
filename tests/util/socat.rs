//! A `socat` pty pair with stable link names: the serial line of the RTU tests (a USB adapter that can
//! be unplugged: stop it, start it again under the same paths).

use std::path::Path;

use super::wait_until;

/// A `socat` pty pair, killed with SIGTERM on drop.
pub struct Socat {
    child: std::process::Child,
}

impl Socat {
    /// Link two ptys at `a` and `b`; returns once both links exist.
    pub async fn start(a: &Path, b: &Path) -> Socat {
        let arg = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let child = match std::process::Command::new("socat").arg(arg(a)).arg(arg(b)).spawn() {
            Ok(c) => c,
            Err(e) => panic!("this test needs socat (apt-get install socat): {e}"),
        };
        wait_until("socat's pty links", || async { a.exists() && b.exists() }).await;
        Socat { child }
    }

    /// SIGTERM, so socat removes its links, then wait for it.
    pub fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        self.stop();
    }
}
