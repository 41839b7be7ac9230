//! `echo`: the backend the Gateway API conformance suite uses. Answers every request with a
//! JSON object holding the request's path, host, method, protocol and headers, plus the
//! namespace and pod name from `POD_NAMESPACE` / `POD_NAME`, so a test knows which backend
//! answered and what the gateway sent it. Each request is also logged to stdout (so a
//! mirrored copy, whose answer goes nowhere, can be seen in the pod's log), and a `delay`
//! query parameter (milliseconds, at most 60 s) holds the answer back, for timeout tests.

use std::collections::BTreeMap;
use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Echo);

struct Echo;

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Head => "HEAD".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Connect => "CONNECT".into(),
        Method::Options => "OPTIONS".into(),
        Method::Trace => "TRACE".into(),
        Method::Patch => "PATCH".into(),
        Method::Other(other) => other.clone(),
    }
}

/// Writes `s` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `content-type` → `Content-Type`, as Go's net/http canonicalises names in the echo format.
fn canonical_header(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        });
        upper = c == '-';
    }
    out
}

/// `?delay=250` → 250 (capped at a minute).
fn delay_ms(path_with_query: &str) -> Option<u64> {
    let (_, query) = path_with_query.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("delay="))
        .and_then(|ms| ms.parse::<u64>().ok())
        .map(|ms| ms.min(60_000))
}

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".into());
        let host = request.authority().unwrap_or_default();
        let method = method_name(&request.method());
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in request.headers().entries() {
            headers
                .entry(canonical_header(&name))
                .or_default()
                .push(String::from_utf8_lossy(&value).into_owned());
        }
        println!("echo: {method} {host} {path}");
        if let Some(ms) = delay_ms(&path) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let namespace = std::env::var("POD_NAMESPACE").unwrap_or_default();
        let pod = std::env::var("POD_NAME").unwrap_or_default();

        let mut json = String::from("{\"path\":");
        json_string(&mut json, &path);
        json.push_str(",\"host\":");
        json_string(&mut json, &host);
        json.push_str(",\"method\":");
        json_string(&mut json, &method);
        json.push_str(",\"proto\":\"HTTP/1.1\",\"headers\":{");
        for (i, (name, values)) in headers.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json_string(&mut json, name);
            json.push_str(":[");
            for (j, v) in values.iter().enumerate() {
                if j > 0 {
                    json.push(',');
                }
                json_string(&mut json, v);
            }
            json.push(']');
        }
        json.push_str("},\"namespace\":");
        json_string(&mut json, &namespace);
        json.push_str(",\"ingress\":\"\",\"service\":\"\",\"pod\":");
        json_string(&mut json, &pod);
        json.push_str("}\n");

        let response_headers = Fields::new();
        let _ = response_headers.set("content-type", &[b"application/json".to_vec()]);
        let response = OutgoingResponse::new(response_headers);
        let Ok(body) = response.body() else { return };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(mut out) = body.write() {
            let _ = out.write_all(json.as_bytes());
            let _ = out.flush();
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
