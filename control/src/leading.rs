//! Work that runs only on the raft leader and moves with leadership: the scheduler and
//! the controllers. Each is an API client that starts from scratch (fresh watches,
//! empty caches) when this member becomes leader and stops the moment it is not.

use std::future::Future;
use std::time::Duration;

/// Runs `work()` whenever `leading()` holds, polling it every `poll`; returns only if
/// the work itself ends.
pub async fn while_leading<W, F>(
    what: &str,
    poll: Duration,
    leading: impl Fn() -> bool + Send + Sync,
    work: W,
) where
    W: Fn() -> F,
    F: Future<Output = ()>,
{
    loop {
        while !leading() {
            tokio::time::sleep(poll).await;
        }
        tracing::info!(work = what, "leading: starting");
        let lost = async {
            while leading() {
                tokio::time::sleep(poll).await;
            }
        };
        tokio::select! {
            () = work() => return,
            () = lost => tracing::info!(work = what, "no longer leading: stopped here"),
        }
    }
}
