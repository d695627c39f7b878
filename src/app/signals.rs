//! The signals the daemon listens to: SIGTERM and SIGINT (Ctrl-C) ask for shutdown, SIGHUP for a
//! reload. Registered once, before the gateway starts, so an early SIGHUP never kills the process (its
//! default action). Only listens; what a signal leads to is [`super::run_with`]'s.

/// What a signal asks for.
pub(super) enum Signal {
    Shutdown,
    Reload,
}

/// SIGTERM / SIGINT (shutdown) and SIGHUP (reload), registered once for the life of the daemon.
pub(super) struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub(super) fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(message = "Cannot listen for a signal.", signal = name, error = %e);
                    None
                }
            };
            Signals {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                hup: listen(SignalKind::hangup(), "SIGHUP"),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    pub(super) async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            let term = async {
                match &mut self.term {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let hup = async {
                match &mut self.hup {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = term => Signal::Shutdown,
                _ = tokio::signal::ctrl_c() => Signal::Shutdown,
                () = hup => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Shutdown
        }
    }
}

/// Resolves on SIGTERM, SIGINT or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
