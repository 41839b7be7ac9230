//! `faulty`: a wasi:http service that misbehaves on request, for the tests that prove one bad
//! guest fails alone. `/trap` panics (a wasm trap), `/spin` loops forever (the CPU deadline
//! must stop it), `/grow?mb=N` allocates N MiB (the memory limit must stop it); anything else
//! answers "ok".

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Faulty);

struct Faulty;

fn reply(response_out: ResponseOutparam, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(mut out) = body.write() {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
    let _ = OutgoingBody::finish(body, None);
}

impl wasip2::exports::http::incoming_handler::Guest for Faulty {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        if path.starts_with("/trap") {
            panic!("faulty guest asked to trap");
        } else if path.starts_with("/spin") {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        } else if let Some(mb) = path.strip_prefix("/grow?mb=") {
            let mb: usize = mb.parse().unwrap_or(1);
            let mut kept = Vec::new();
            for _ in 0..mb {
                kept.push(std::hint::black_box(vec![1u8; 1 << 20]));
            }
            reply(response_out, &format!("grew {} MiB\n", kept.len()));
        } else {
            reply(response_out, "ok\n");
        }
    }
}
