//! The node's counters, rendered in Prometheus text format on the kubelet endpoint's
//! `/metrics`. Tests read them too: "no re-download after a restart" is
//! `brink_blob_downloads_total == 0`, checked the way an operator would.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one node agent. All monotonic.
#[derive(Debug, Default)]
pub struct Metrics {
    pub blob_downloads: AtomicU64,
    pub blob_download_bytes: AtomicU64,
    pub blob_cache_hits: AtomicU64,
    pub blob_corrupt_dropped: AtomicU64,
    pub pull_errors: AtomicU64,
    pub compilations: AtomicU64,
    pub compile_cache_hits: AtomicU64,
    pub container_starts: AtomicU64,
    pub container_restarts: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_guest_errors: AtomicU64,
    pub http_deadline_exceeded: AtomicU64,
    pub gateway_requests: AtomicU64,
    pub gateway_not_found: AtomicU64,
    pub gateway_server_errors: AtomicU64,
    pub gateway_unavailable: AtomicU64,
    pub gateway_timeouts: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, running_pods: usize) -> String {
        let rows: [(&str, &str, &AtomicU64); 17] = [
            (
                "brink_blob_downloads_total",
                "Blobs fetched from a registry or layout.",
                &self.blob_downloads,
            ),
            (
                "brink_blob_download_bytes_total",
                "Bytes of blobs fetched.",
                &self.blob_download_bytes,
            ),
            (
                "brink_blob_cache_hits_total",
                "Blob fetches served by the local cache.",
                &self.blob_cache_hits,
            ),
            (
                "brink_blob_corrupt_dropped_total",
                "Cached blobs that failed verification and were deleted.",
                &self.blob_corrupt_dropped,
            ),
            (
                "brink_image_pull_errors_total",
                "Image pulls that failed.",
                &self.pull_errors,
            ),
            (
                "brink_compilations_total",
                "Wasm artifacts compiled with Cranelift.",
                &self.compilations,
            ),
            (
                "brink_compile_cache_hits_total",
                "Wasm artifacts loaded precompiled from disk or memory.",
                &self.compile_cache_hits,
            ),
            (
                "brink_container_starts_total",
                "Containers started.",
                &self.container_starts,
            ),
            (
                "brink_container_restarts_total",
                "Containers restarted by their restart policy or a liveness probe.",
                &self.container_restarts,
            ),
            (
                "brink_http_requests_total",
                "HTTP requests handed to guests.",
                &self.http_requests,
            ),
            (
                "brink_http_guest_errors_total",
                "HTTP requests whose guest trapped or failed.",
                &self.http_guest_errors,
            ),
            (
                "brink_http_deadline_exceeded_total",
                "HTTP requests interrupted by the CPU deadline.",
                &self.http_deadline_exceeded,
            ),
            (
                "brink_gateway_requests_total",
                "Requests received on Gateway listeners.",
                &self.gateway_requests,
            ),
            (
                "brink_gateway_not_found_total",
                "Gateway requests no route matched (404).",
                &self.gateway_not_found,
            ),
            (
                "brink_gateway_invalid_backend_total",
                "Gateway requests for an invalid backend or unresolvable filter (500).",
                &self.gateway_server_errors,
            ),
            (
                "brink_gateway_unavailable_total",
                "Gateway requests with no ready endpoint (503).",
                &self.gateway_unavailable,
            ),
            (
                "brink_gateway_timeouts_total",
                "Gateway requests past a route's request or backend timeout (504).",
                &self.gateway_timeouts,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP brink_pods Pods the node is running.\n# TYPE brink_pods gauge\nbrink_pods {running_pods}"
        );
        out
    }
}
