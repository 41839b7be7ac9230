//! The socket pair between agent and sandbox, framed with `brink_proto::sandbox`.
//!
//! [`BlockingLink`] serves the sandbox while it is single-threaded and has no runtime;
//! [`spawn_link`] turns a socket into a writer task fed by a bounded queue (frames queued
//! together go out in one write) and a stream of decoded messages. A frame error ends the
//! link: the peer is not to be trusted with the next byte.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use brink_proto::sandbox::{FrameDecoder, FrameError, Message, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Frames queued for writing per link before senders wait.
pub const LINK_QUEUE_FRAMES: usize = 1024;
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the peer closed the link")]
    Closed,
    #[error("garbled frame from the peer: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A blocking, framed socket.
pub struct BlockingLink {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl BlockingLink {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    pub fn send(&mut self, message: &Message) -> Result<(), LinkError> {
        let frame = encode(message)?;
        self.stream.write_all(&frame)?;
        Ok(())
    }

    pub fn recv(&mut self) -> Result<Message, LinkError> {
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(message) = self.decoder.next_message()? {
                return Ok(message);
            }
            let n = self.stream.read(&mut buffer)?;
            if n == 0 {
                return Err(LinkError::Closed);
            }
            self.decoder.push(&buffer[..n]);
        }
    }

    /// Hands the socket and any bytes already buffered to the async side.
    pub fn into_parts(self) -> (UnixStream, FrameDecoder) {
        (self.stream, self.decoder)
    }
}

/// What the writer task is asked to do.
enum Outgoing {
    Frame(Vec<u8>),
    /// Answer once everything queued before has been written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The sending half of a link: cheap to clone.
#[derive(Clone)]
pub struct LinkSender {
    queue: mpsc::Sender<Outgoing>,
}

impl LinkSender {
    /// Queues a message; fails when the link is gone or the message cannot be framed.
    pub async fn send(&self, message: &Message) -> Result<(), LinkError> {
        let frame = encode(message)?;
        self.queue
            .send(Outgoing::Frame(frame))
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Waits until every message queued so far is written to the socket: a process about
    /// to exit calls this, or its last words die in the queue.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.queue.send(Outgoing::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Queues a message without waiting; for callers that cannot (log output from a
    /// guest's write callback). Drops the frame when the queue is full.
    pub fn try_send(&self, message: &Message) -> Result<(), LinkError> {
        let frame = encode(message)?;
        self.queue
            .try_send(Outgoing::Frame(frame))
            .map_err(|_| LinkError::Closed)
    }

    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

/// Starts the writer and reader tasks of a link. Messages arrive on the returned receiver
/// until the peer closes the link or sends garbage, which ends the stream with the error.
pub fn spawn_link(
    stream: UnixStream,
    decoder: FrameDecoder,
) -> io::Result<(LinkSender, mpsc::Receiver<Result<Message, LinkError>>)> {
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (mut reader, mut writer) = stream.into_split();
    let (queue, mut outgoing) = mpsc::channel::<Outgoing>(LINK_QUEUE_FRAMES);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(READ_BUFFER_BYTES);
        let mut flushes = Vec::new();
        while let Some(first) = outgoing.recv().await {
            // Everything already queued goes out in one write.
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match item {
                    Outgoing::Frame(frame) => batch.extend_from_slice(&frame),
                    Outgoing::Flush(done) => flushes.push(done),
                }
                if batch.len() < READ_BUFFER_BYTES {
                    next = outgoing.try_recv().ok();
                }
            }
            if writer.write_all(&batch).await.is_err() {
                break;
            }
            batch.clear();
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    });
    let (deliver, messages) = mpsc::channel(LINK_QUEUE_FRAMES);
    tokio::spawn(async move {
        let mut decoder = decoder;
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        loop {
            loop {
                match decoder.next_message() {
                    Ok(Some(message)) => {
                        if deliver.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = deliver.send(Err(LinkError::Frame(e))).await;
                        return;
                    }
                }
            }
            match reader.read(&mut buffer).await {
                Ok(0) => {
                    let _ = deliver.send(Err(LinkError::Closed)).await;
                    return;
                }
                Ok(n) => decoder.push(&buffer[..n]),
                Err(e) => {
                    let _ = deliver.send(Err(LinkError::Io(e))).await;
                    return;
                }
            }
        }
    });
    Ok((LinkSender { queue }, messages))
}
