//! Health and readiness for HTTP probes (SPEC S-8): `/healthz` and `/readyz`, answered by the
//! responder in [`crate::metrics::serve`] on `--metrics-addr` and on `--health-addr`.
//!
//! Shell-side state, shared between the main loop (which beats and marks readiness) and the
//! responder thread (which asks). The verdicts are pure functions of that state and `now`.
//!
//! * live: the main loop came round within [`Health::stale`] (three of its wake-up intervals:
//!   the watchdog interval under systemd, else 30 s). A pass in progress does not beat; a pass
//!   longer than that is itself a problem worth a failing probe.
//! * ready: live, the first full reconcile is done, and the API server answered within the last
//!   resync period or a watch stream is open now (TCP keepalive notices a dead one within a
//!   minute, SPEC S-5).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kube::WatchStats;

/// What the probes look at.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    /// Milliseconds after `epoch` of the main loop's last beat.
    beat_ms: AtomicU64,
    ready: AtomicBool,
    /// A beat older than this fails `/healthz`.
    pub stale: Duration,
    /// No answer from the API server for longer than this (the resync period) fails `/readyz`.
    pub api_within: Duration,
    stats: Arc<WatchStats>,
}

impl Health {
    /// Healthy from now (a beat at creation), not ready.
    pub fn new(stale: Duration, api_within: Duration, stats: Arc<WatchStats>) -> Health {
        Health {
            epoch: Instant::now(),
            beat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            stale,
            api_within,
            stats,
        }
    }

    /// The main loop came round.
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// The first full reconcile is done.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// `/healthz`: `Err` says why not.
    pub fn live(&self, now: Instant) -> Result<(), String> {
        let beat = self.epoch + Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        let since = now.saturating_duration_since(beat);
        if since > self.stale {
            return Err(format!(
                "main loop stuck: last came round {}s ago",
                since.as_secs()
            ));
        }
        Ok(())
    }

    /// `/readyz`: `Err` says why not.
    pub fn ready(&self, now: Instant) -> Result<(), String> {
        self.live(now)?;
        if !self.ready.load(Ordering::Relaxed) {
            return Err("waiting for the first reconcile".into());
        }
        if self.stats.open_streams() > 0 {
            return Ok(());
        }
        match self.stats.contact() {
            Some(t) if now.saturating_duration_since(t) <= self.api_within => Ok(()),
            Some(t) => Err(format!(
                "API server not reached for {}s",
                now.saturating_duration_since(t).as_secs()
            )),
            None => Err("API server never reached".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_beats_readiness_and_api_contact() {
        let stats = Arc::new(WatchStats::default());
        let h = Health::new(
            Duration::from_secs(900),
            Duration::from_secs(300),
            stats.clone(),
        );
        let t0 = Instant::now();
        assert_eq!(h.live(t0), Ok(()));
        assert_eq!(
            h.ready(t0),
            Err("waiting for the first reconcile".to_string())
        );
        h.set_ready();
        assert_eq!(h.ready(t0), Err("API server never reached".to_string()));
        stats.touch();
        let t1 = Instant::now();
        assert_eq!(h.ready(t1), Ok(()));
        assert!(h
            .ready(t1 + Duration::from_secs(301))
            .unwrap_err()
            .starts_with("API server not reached for 30"));
        let later = t0 + Duration::from_secs(901);
        assert!(h.live(later).unwrap_err().starts_with("main loop stuck"));
        assert!(h.ready(later).unwrap_err().starts_with("main loop stuck"));
    }
}
