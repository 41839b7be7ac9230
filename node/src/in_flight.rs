//! Requests in flight, counted so that the count survives a request being abandoned: a
//! client that disconnects (or a gateway that answers 504) drops the request's future
//! mid-await, and a count decremented after the await would stay up for good, holding
//! the pod's graceful stop for its whole grace period.
//!
//! A [`Gate`] adds closing: a stopping container refuses requests that reach it after it
//! left the gateway's endpoints (a proxy holding an older backend map), so the proxy can
//! hand the untouched request to another endpoint instead of racing the stop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One request in flight; leaving it (by finishing or being dropped) counts it out.
pub struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    pub fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Requests in flight to one container, and whether it still takes new ones.
#[derive(Default)]
pub struct Gate {
    in_flight: AtomicU64,
    closed: AtomicBool,
}

impl Gate {
    /// Counts a request in, or refuses it (`None`) once the gate is closed.
    ///
    /// Counting in before looking at `closed` (and `close` storing before the stopper
    /// reads the count, all sequentially consistent) means a request either sees the gate
    /// closed or is counted by the time the stopper waits for the count to drain.
    pub fn enter(&self) -> Option<InFlight<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(&self.in_flight);
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        Some(guard)
    }

    /// Takes no new requests; those already in are still counted until they finish.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_abandoned_request_is_counted_out() {
        let counter = AtomicU64::new(0);
        let request = async {
            let _in = InFlight::enter(&counter);
            std::future::pending::<()>().await;
        };
        let abandoned = tokio::time::timeout(std::time::Duration::from_millis(10), request).await;
        assert!(abandoned.is_err(), "the request never finished");
        assert_eq!(counter.load(Ordering::Relaxed), 0);
        {
            let _a = InFlight::enter(&counter);
            let _b = InFlight::enter(&counter);
            assert_eq!(counter.load(Ordering::Relaxed), 2);
        }
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_closed_gate_refuses_new_requests_and_still_counts_old_ones() {
        let gate = Gate::default();
        let old = gate.enter();
        assert!(old.is_some());
        gate.close();
        assert!(gate.is_closed());
        assert!(gate.enter().is_none(), "a closed gate took a request");
        assert_eq!(gate.in_flight(), 1, "the refused request is not counted");
        drop(old);
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn a_request_racing_the_close_is_refused_or_waited_for() {
        // Whatever the interleaving, a request that got in is seen by the stopper.
        for _ in 0..200 {
            let gate = std::sync::Arc::new(Gate::default());
            let admitted = std::sync::Arc::new(AtomicBool::new(false));
            let release = std::sync::Arc::new(AtomicBool::new(false));
            let request = {
                let (gate, admitted, release) = (gate.clone(), admitted.clone(), release.clone());
                std::thread::spawn(move || {
                    if let Some(_in) = gate.enter() {
                        admitted.store(true, Ordering::SeqCst);
                        while !release.load(Ordering::SeqCst) {
                            std::hint::spin_loop();
                        }
                    }
                })
            };
            gate.close();
            let seen = gate.in_flight();
            // If the stopper saw nothing in flight, the request must have been refused.
            if seen == 0 {
                release.store(true, Ordering::SeqCst);
                request.join().expect("request thread");
                assert!(
                    !admitted.load(Ordering::SeqCst),
                    "a request slipped past the stop"
                );
            } else {
                release.store(true, Ordering::SeqCst);
                request.join().expect("request thread");
            }
            assert_eq!(gate.in_flight(), 0);
        }
    }
}
