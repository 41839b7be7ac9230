//! httpGet probes, sent straight into the container's wasi:http handler (the container is
//! the service; there is no network hop to take).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::sandbox::Service;

/// A probe's timing, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

impl ProbeTiming {
    pub fn of(probe: &Probe) -> Self {
        let secs = |v: Option<i32>, default: u64| {
            Duration::from_secs(v.map_or(default, |v| v.max(0) as u64))
        };
        Self {
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10),
            timeout: secs(probe.timeout_seconds, 1),
            failure_threshold: probe.failure_threshold.map_or(3, |v| v.max(1) as u32),
            success_threshold: probe.success_threshold.map_or(1, |v| v.max(1) as u32),
        }
    }
}

/// Runs one probe: success is a status in 200..400 within the timeout.
pub async fn probe_http(app: &Service, probe: &Probe, timing: &ProbeTiming) -> bool {
    let Some(get) = &probe.http_get else {
        return false;
    };
    let path = get.path.as_deref().unwrap_or("/");
    let port = match &get.port {
        IntOrString::Int(p) => p.to_string(),
        IntOrString::String(name) => name.clone(),
    };
    let host = get.host.clone().unwrap_or_else(|| "localhost".into());
    let mut builder = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", format!("{host}:{port}"))
        .header("user-agent", "brink-probe/1");
    for header in get.http_headers.iter().flatten() {
        builder = builder.header(header.name.as_str(), header.value.as_str());
    }
    let Ok(request) = builder.body(Empty::<Bytes>::new()) else {
        return false;
    };
    match tokio::time::timeout(timing.timeout, app.handle(request)).await {
        Ok(response) => (200..400).contains(&response.status().as_u16()),
        Err(_) => false,
    }
}
