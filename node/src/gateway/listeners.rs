//! Gateway ports: one hyper server per port (HTTP/1.1 and HTTP/2, h2c by prior knowledge
//! or through TLS with ALPN), opened and closed as the compiled plan changes. A port that
//! stays open keeps its connections; only its certificates and the shared route table
//! change under it, so an edit never drops a request in flight.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::compile::PortPlan;
use super::endpoints::BackendMap;
use super::proxy::{self, Downstream};
use super::table::{Protocol, RouteTable, wildcard_matches};

/// What every port's server reads on each request.
pub struct Shared {
    pub table: ArcSwap<RouteTable>,
    pub backends: ArcSwap<BackendMap>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Certificates of one HTTPS port, picked by SNI like listeners are by host.
#[derive(Debug, Default)]
struct Certificates {
    by_host: ArcSwap<Vec<(Option<String>, Arc<CertifiedKey>)>>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.by_host.load();
        let name = hello.server_name().map(|n| n.to_ascii_lowercase());
        if let Some(name) = &name {
            if let Some((_, c)) = certs
                .iter()
                .find(|(h, _)| h.as_deref() == Some(name.as_str()))
            {
                return Some(c.clone());
            }
            let mut wildcards: Vec<_> = certs
                .iter()
                .filter_map(|(h, c)| Some((h.as_deref()?.strip_prefix('*')?, c)))
                .filter(|(suffix, _)| wildcard_matches(suffix, name))
                .collect();
            wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
            if let Some((_, c)) = wildcards.first() {
                return Some((*c).clone());
            }
        }
        certs
            .iter()
            .find(|(h, _)| h.is_none())
            .or_else(|| certs.first())
            .map(|(_, c)| c.clone())
    }
}

struct OpenPort {
    protocol: Protocol,
    certificates: Arc<Certificates>,
    stop: Option<oneshot::Sender<Duration>>,
    task: JoinHandle<()>,
}

/// How every gateway port treats its connections (from the node's settings).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a closing port gives open connections to finish.
    pub drain: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers (None: no limit).
    pub header_read_timeout: Option<Duration>,
    /// How long a TLS handshake may take before the connection is dropped.
    pub tls_handshake_timeout: Duration,
    /// The most header bytes a request may carry (HTTP/1.1 read buffer, HTTP/2 header
    /// list): more is refused before any route or guest sees it.
    pub max_header_bytes: usize,
}

/// The open gateway ports.
pub struct Listeners {
    address: IpAddr,
    limits: ConnectionLimits,
    shared: Arc<Shared>,
    open: HashMap<u16, OpenPort>,
}

impl Listeners {
    pub fn new(address: IpAddr, limits: ConnectionLimits, shared: Arc<Shared>) -> Self {
        Self {
            address,
            limits,
            shared,
            open: HashMap::new(),
        }
    }

    /// Makes the open ports those of `plan`: closes the rest (draining them), opens new
    /// ones, updates certificates. Returns the ports that could not be opened, and why.
    pub async fn apply(&mut self, plan: &BTreeMap<u16, PortPlan>) -> HashMap<u16, String> {
        let stale: Vec<u16> = self
            .open
            .iter()
            .filter(|(port, open)| {
                plan.get(port)
                    .is_none_or(|p| p.table.protocol != open.protocol)
            })
            .map(|(port, _)| *port)
            .collect();
        for port in stale {
            if let Some(mut open) = self.open.remove(&port) {
                tracing::info!(port, "closing gateway port");
                if let Some(stop) = open.stop.take() {
                    let _ = stop.send(self.limits.drain);
                }
                // Draining happens in the port's own task; no need to wait for it here.
            }
        }
        let mut errors = HashMap::new();
        for (port, p) in plan {
            if let Some(open) = self.open.get(port) {
                open.certificates
                    .by_host
                    .store(Arc::new(p.certificates.clone()));
                continue;
            }
            let addr = SocketAddr::new(self.address, *port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot open gateway port");
                    errors.insert(*port, e.to_string());
                    continue;
                }
            };
            tracing::info!(%addr, protocol = ?p.table.protocol, "gateway port open");
            let certificates = Arc::new(Certificates::default());
            certificates.by_host.store(Arc::new(p.certificates.clone()));
            let tls = (p.table.protocol == Protocol::Https).then(|| {
                let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.with_no_client_auth()
                        .with_cert_resolver(certificates.clone())
                });
                if let Ok(config) = config.as_mut() {
                    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                }
                config.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)))
            });
            let tls = match tls.transpose() {
                Ok(tls) => tls,
                Err(e) => {
                    errors.insert(*port, format!("TLS set-up: {e}"));
                    continue;
                }
            };
            let (stop, stop_rx) = oneshot::channel();
            let task = tokio::spawn(serve(
                listener,
                tls,
                self.limits,
                Downstream {
                    port: *port,
                    https: p.table.protocol == Protocol::Https,
                },
                self.shared.clone(),
                stop_rx,
            ));
            self.open.insert(
                *port,
                OpenPort {
                    protocol: p.table.protocol,
                    certificates,
                    stop: Some(stop),
                    task,
                },
            );
        }
        errors
    }

    /// Closes every port, giving connections `drain` to finish.
    pub async fn close_all(&mut self) {
        let tasks: Vec<_> = self
            .open
            .drain()
            .map(|(_, mut open)| {
                if let Some(stop) = open.stop.take() {
                    let _ = stop.send(self.limits.drain);
                }
                open.task
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnectionLimits,
    downstream: Downstream,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<Duration>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's smallest read buffer is 8 KiB.
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192))
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let table = shared.table.load_full();
                    let backends = shared.backends.load_full();
                    let metrics = shared.metrics.clone();
                    let id = metrics.gateway_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    let span = tracing::debug_span!("gateway_request", id, port = downstream.port, %peer);
                    let request = request.map(|b| b.boxed_unsync());
                    tracing::Instrument::instrument(async move {
                        let response = proxy::handle(table, backends, downstream, request).await;
                        let counter = match response.status().as_u16() {
                            404 => Some(&metrics.gateway_not_found),
                            500 => Some(&metrics.gateway_server_errors),
                            503 => Some(&metrics.gateway_unavailable),
                            504 => Some(&metrics.gateway_timeouts),
                            _ => None,
                        };
                        if let Some(counter) = counter {
                            crate::metrics::Metrics::inc(counter);
                        }
                        tracing::debug!(status = response.status().as_u16(), "answered");
                        Ok::<_, std::convert::Infallible>(response)
                    }, span)
                });
                match &tls {
                    None => {
                        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                        let connection = graceful.watch(connection);
                        tokio::spawn(async move {
                            if let Err(e) = connection.await {
                                tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
                            }
                        });
                    }
                    Some(acceptor) => {
                        // The handshake runs in the connection's task, so a slow client
                        // never holds up the accept loop.
                        let acceptor = acceptor.clone();
                        let builder = builder.clone();
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            let stream = match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                            if let Err(e) = watcher.watch(connection).await {
                                tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
                            }
                        });
                    }
                }
            }
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
        }
    };
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}
