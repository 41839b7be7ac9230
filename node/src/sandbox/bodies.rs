//! HTTP messages across the link: heads to and from [`HttpHead`], bodies as chunk streams.
//! Shared by both ends, for inbound requests and for guests' outbound calls.

use brink_proto::sandbox::{Chunk, HttpHead, MAX_CHUNK_BYTES, Message};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use wasmtime_wasi_http::Error as HttpError;

use super::link::LinkSender;

/// Body chunks in flight per stream before the reader of the link waits.
pub const BODY_QUEUE_CHUNKS: usize = 16;

/// The receiving side of a streamed body.
pub type ChunkSender = mpsc::Sender<Result<Frame<Bytes>, HttpError>>;

/// A body fed by chunks from the link, and the sender that feeds it.
pub fn channel_body() -> (ChunkSender, wasmtime_wasi_http::p2::body::HyperOutgoingBody) {
    let (sender, receiver) = mpsc::channel(BODY_QUEUE_CHUNKS);
    let stream = tokio_stream_from(receiver);
    (sender, StreamBody::new(stream).boxed_unsync())
}

fn tokio_stream_from(
    mut receiver: mpsc::Receiver<Result<Frame<Bytes>, HttpError>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, HttpError>> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// The wire head of a request opening stream `id`.
pub fn request_head(id: u64, parts: &http::request::Parts) -> HttpHead {
    HttpHead {
        id,
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        status: 0,
        headers: head_headers(&parts.headers),
    }
}

/// The wire head of the response on stream `id`.
pub fn response_head(id: u64, parts: &http::response::Parts) -> HttpHead {
    HttpHead {
        id,
        method: String::new(),
        uri: String::new(),
        status: parts.status.as_u16(),
        headers: head_headers(&parts.headers),
    }
}

/// A request's or response's headers as wire pairs.
fn head_headers(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

/// Rebuilds a header map; names or values that are not valid HTTP are an error.
pub fn header_map(head: &HttpHead) -> Result<http::HeaderMap, String> {
    let mut map = http::HeaderMap::with_capacity(head.headers.len());
    for (name, value) in &head.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = http::HeaderValue::from_bytes(value)
            .map_err(|_| format!("invalid value of header {name}"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Sends `body` over the link as chunks of stream `id`, wrapped by `wrap`; ends the stream
/// (with an empty final chunk) when the body ends or fails.
pub async fn pump_body<B>(id: u64, body: B, link: &LinkSender, wrap: fn(Chunk) -> Message)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut body = body;
    // A failed body ends the stream like a finished one: the reader sees it cut short.
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue; // trailers are not carried
        };
        for piece in data.chunks(MAX_CHUNK_BYTES) {
            let chunk = Chunk {
                id,
                end: false,
                bytes: piece.to_vec(),
            };
            if link.send(&wrap(chunk)).await.is_err() {
                return;
            }
        }
    }
    let _ = link
        .send(&wrap(Chunk {
            id,
            end: true,
            bytes: Vec::new(),
        }))
        .await;
}

/// Feeds one received chunk into its body; returns whether the stream is still open.
pub async fn feed(sender: &ChunkSender, chunk: Chunk) -> bool {
    if !chunk.bytes.is_empty()
        && sender
            .send(Ok(Frame::data(Bytes::from(chunk.bytes))))
            .await
            .is_err()
    {
        return false;
    }
    !chunk.end
}
