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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Echoes one byte back per byte read, until the client closes.
    async fn echo(mut tcp: TcpStream) {
        let mut byte = [0u8; 1];
        while let Ok(1) = tcp.read(&mut byte).await {
            if tcp.write_all(&byte).await.is_err() {
                return;
            }
        }
    }

    async fn served(tcp: &mut TcpStream) -> bool {
        if tcp.write_all(b"x").await.is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte)).await,
            Ok(Ok(1))
        )
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_and_a_freed_slot_is_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(accept_loop(listener, 2, "test", |tcp, _| echo(tcp)));
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        assert!(served(&mut first).await);
        assert!(served(&mut second).await);
        let mut third = TcpStream::connect(addr).await.expect("connect");
        assert!(!served(&mut third).await, "a third connection was served");
        drop(first);
        // The slot comes back once the server has seen the close.
        let mut fourth_served = false;
        for _ in 0..100 {
            let mut fourth = TcpStream::connect(addr).await.expect("connect");
            if served(&mut fourth).await {
                fourth_served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fourth_served, "the freed slot was never reused");
        assert!(
            served(&mut second).await,
            "an open connection was disturbed"
        );
    }
}
