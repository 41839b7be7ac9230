//! `hello`: the smallest useful wasi:http service. Answers every request with a greeting,
//! taken from the `GREETING` environment variable (default "Hello"), and the name of the pod
//! that served it (`POD_NAME`), so a user can see which pod answered.

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hello);

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_string());
        let pod = std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".to_string());
        let text = format!("{greeting} from Brink! (pod {pod})\n");

        let headers = Fields::new();
        let _ = headers.set("content-type", &[b"text/plain; charset=utf-8".to_vec()]);
        let response = OutgoingResponse::new(headers);
        let Ok(body) = response.body() else { return };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(mut out) = body.write() {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
