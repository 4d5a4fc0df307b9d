//! The real process's waits: the loop policy's [`loops::Waits`] on a clock,
//! PostgreSQL's notifications and the shutdown signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::pipeline::loops;
use crate::postgres::RowsCommitted;
use crate::postgres::source::IdleRegistry;

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
/// process: tokio's timers, SIGINT/SIGTERM, and PostgreSQL's notifications.
pub(super) struct RealWaits {
    poll: Duration,
    wake: Option<(watch::Receiver<u64>, Arc<IdleRegistry>)>,
    shutdown: Shutdown,
    origin: Instant,
}

impl RealWaits {
    pub(super) fn new(poll: Duration, wake: Option<&RowsCommitted>, shutdown: Shutdown) -> Self {
        let wake = wake.map(|w| (w.count.clone(), w.registry.clone()));
        RealWaits { poll, wake, shutdown, origin: Instant::now() }
    }
}

impl loops::Waits for RealWaits {
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn step<T>(&mut self, step: impl Future<Output = T>) -> Option<T> {
        // Notifications from here on wake the idle wait after this step,
        // even those that arrive while it runs.
        if let Some((w, _)) = self.wake.as_mut() {
            w.borrow_and_update();
        }
        tokio::select! {
            out = step => Some(out),
            () = grace(self.shutdown.clone()) => None,
        }
    }

    /// Registers idle and returns, for one more look; registered, waits
    /// until PostgreSQL notifies that rows changed, the poll interval passes
    /// (the fallback for lost notifications), or shutdown.
    async fn idle(&mut self) {
        let Some((wake, registry)) = self.wake.as_mut() else { return pause(self.poll, &mut self.shutdown).await };
        if !registry.waiting() {
            match registry.register().await {
                Ok(()) => return,
                Err(e) => tracing::debug!("{e:#}; waiting the poll interval instead"),
            }
        }
        let mut sleeping = self.shutdown.clone();
        tokio::select! {
            changed = wake.changed() => if changed.is_err() {
                pause(self.poll, &mut self.shutdown).await;
            },
            () = pause(self.poll, &mut sleeping) => {}
        }
    }

    async fn busy(&mut self) {
        if let Some((_, registry)) = self.wake.as_ref()
            && registry.waiting()
            && let Err(e) = registry.unregister().await
        {
            tracing::debug!("{e:#}");
        }
    }

    async fn pause(&mut self, d: Duration) {
        pause(d, &mut self.shutdown).await;
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}
