//! `fetch`: a wasi:http service that makes one outbound request, for the tests of the
//! outbound allow-list. `GET /?url=http://host:port/path` fetches that URL and answers with
//! the upstream's status and body; when the host refuses it (or the request fails) it answers
//! 502 with the error.

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};

wasip2::http::proxy::export!(Fetch);

struct Fetch;

fn reply(response_out: ResponseOutparam, status: u16, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    let _ = response.set_status_code(status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(mut out) = body.write() {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
    let _ = OutgoingBody::finish(body, None);
}

/// `http://host:port/path` → (scheme, authority, path).
fn split_url(url: &str) -> Option<(Scheme, String, String)> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else {
        (Scheme::Https, url.strip_prefix("https://")?)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Some((scheme, authority.to_string(), path.to_string()))
}

fn fetch(url: &str) -> Result<(u16, String), String> {
    let (scheme, authority, path) = split_url(url).ok_or("expected ?url=http://host:port/path")?;
    let request = OutgoingRequest::new(Fields::new());
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| "bad scheme")?;
    request
        .set_authority(Some(&authority))
        .map_err(|()| "bad authority")?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| "bad path")?;
    let pending = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.consume().map_err(|()| "no body")?;
    let mut text = String::new();
    if let Ok(mut stream) = body.stream() {
        let _ = stream.read_to_string(&mut text);
    }
    Ok((status, text))
}

impl wasip2::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let url = path
            .split_once("url=")
            .map(|(_, u)| u.to_string())
            .unwrap_or_default();
        match fetch(&url) {
            Ok((status, body)) => reply(response_out, 200, &format!("upstream {status}: {body}")),
            Err(error) => reply(
                response_out,
                502,
                &format!("outbound request failed: {error}\n"),
            ),
        }
    }
}
