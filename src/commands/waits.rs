//! The real process's waits: the loop policy's [`loops::Waits`] on a clock
//! and the shutdown signal.

use std::time::{Duration, Instant};

use crate::pipeline::loops;

use super::Shutdown;

/// How long a step may go on after shutdown was asked.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Resolves [`STOP_GRACE`] after shutdown was asked. A step still running
/// then is abandoned: that is exactly what a crash does, which the pipeline
/// is built (and tested) to survive, so stopping never waits on a hung call.
pub(super) async fn grace(mut shutdown: Shutdown) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
    tokio::time::sleep(STOP_GRACE).await;
}

/// Sleeps for `d` or until shutdown is asked, whichever comes first.
pub(super) async fn pause(d: Duration, shutdown: &mut Shutdown) {
    if !*shutdown.borrow() {
        let _ = tokio::time::timeout(d, shutdown.changed()).await;
    }
}

/// Time and shutdown for the pipeline's loops ([`loops::Waits`]) in a real
/// process: tokio's timers and SIGINT/SIGTERM.
pub(super) struct RealWaits {
    shutdown: Shutdown,
    origin: Instant,
}

impl RealWaits {
    pub(super) fn new(shutdown: Shutdown) -> Self {
        RealWaits { shutdown, origin: Instant::now() }
    }
}

impl loops::Waits for RealWaits {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn step<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            out = step => Some(out),
            () = grace(self.shutdown.clone()) => None,
        }
    }

    async fn pause(&mut self, d: Duration) {
        pause(d, &mut self.shutdown).await;
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}
