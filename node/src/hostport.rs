//! Host ports: a container port with a `hostPort` is served on that port of the node by a
//! hyper server (HTTP/1.1 and h2c) that hands each request to the container's wasi:http
//! handler. The gateway data plane replaces this for routed traffic; host ports remain for
//! direct access, as on a kubelet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::sandbox::Service;

/// The host ports open on this node, and which container owns each.
#[derive(Default)]
pub struct HostPorts {
    owners: Mutex<HashMap<SocketAddr, String>>,
}

/// An open host port. `shutdown` drains it; dropping it closes it at once.
pub struct HostPortListener {
    addr: SocketAddr,
    ports: Arc<HostPorts>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<()>>,
}

impl HostPorts {
    /// Opens `addr` for `owner`'s `app`. Refuses a port another container holds.
    pub async fn bind(
        self: &Arc<Self>,
        addr: SocketAddr,
        owner: String,
        app: Service,
    ) -> std::io::Result<HostPortListener> {
        {
            let mut owners = self
                .owners
                .lock()
                .map_err(|_| std::io::Error::other("host port table poisoned"))?;
            if let Some(holder) = owners.get(&addr) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("already used by {holder}"),
                ));
            }
            owners.insert(addr, owner);
        }
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                self.release(addr);
                return Err(e);
            }
        };
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, app, stop_rx));
        Ok(HostPortListener {
            addr,
            ports: self.clone(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    fn release(&self, addr: SocketAddr) {
        if let Ok(mut owners) = self.owners.lock() {
            owners.remove(&addr);
        }
    }
}

impl HostPortListener {
    /// Stops accepting, then gives open connections up to `grace` to finish.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for HostPortListener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.ports.release(self.addr);
    }
}

async fn serve(listener: TcpListener, app: Service, mut stop: oneshot::Receiver<Duration>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, std::convert::Infallible>(app.handle(request).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
        }
    };
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}
