//! Requests in flight, counted so that the count survives a request being abandoned: a
//! client that disconnects (or a gateway that answers 504) drops the request's future
//! mid-await, and a count decremented after the await would stay up for good, holding
//! the pod's graceful stop for its whole grace period.

use std::sync::atomic::{AtomicU64, Ordering};

/// One request in flight; leaving it (by finishing or being dropped) counts it out.
pub struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    pub fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
}
