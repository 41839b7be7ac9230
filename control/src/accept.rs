//! Accepting TCP connections for the HTTP servers a member runs (the Kubernetes API and
//! the store's debugging API): at most a set number open at once (a new one past that
//! is closed at once, so idle clients cannot take every file handle), and a pause that
//! doubles up to a second when accepting fails (out of file handles), rather than a
//! loop that spins and logs.
//!
//! Owns only the listening socket; each connection is handed to the caller's future.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The first pause after a failed accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause after failed accepts.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts forever, running `serve` for each connection on its own task.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    what: &'static str,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => {
                backoff = ACCEPT_BACKOFF_MIN;
                c
            }
            Err(e) => {
                tracing::warn!(server = what, error = %e, wait = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(server = what, %peer, "connection limit reached; closing a new connection");
            continue;
        };
        let connection = serve(tcp, peer);
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
}
