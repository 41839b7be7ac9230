//! Container logs: every stdout and stderr line of a container, stamped and appended to a
//! per-container file in the CRI format kubelets use (`<RFC3339Nano> <stream> F <line>`),
//! rotated by size. Readers get `tailLines`, `timestamps` and `follow`, like `kubectl logs`.
//!
//! Writes are small appends to a file under a mutex: they reach the page cache in
//! microseconds and are not flushed, so they are safe to make from a guest's I/O callback.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use k8s_openapi::jiff::Timestamp;
use tokio::io::AsyncWrite;

/// Which standard stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The longest line kept whole; longer output is split, as CRI runtimes do.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// The log of one container, shared by every instance of it.
#[derive(Debug)]
pub struct ContainerLog {
    path: PathBuf,
    max_file_bytes: u64,
    max_files: usize,
    state: Mutex<LogState>,
}

#[derive(Debug, Default)]
struct LogState {
    file: Option<File>,
    size: u64,
    partial: [Vec<u8>; 2],
}

impl ContainerLog {
    /// Opens (appending) the log at `path`, creating its directory.
    pub fn open(path: PathBuf, max_file_bytes: u64, max_files: usize) -> io::Result<Arc<Self>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Arc::new(Self {
            path,
            max_file_bytes,
            max_files: max_files.max(1),
            state: Mutex::new(LogState {
                file: Some(file),
                size,
                partial: Default::default(),
            }),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends raw output; complete lines are written, a trailing partial line waits.
    pub fn write(&self, stream: Stream, bytes: &[u8]) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let index = stream as usize;
        state.partial[index].extend_from_slice(bytes);
        loop {
            let buffer = &state.partial[index];
            let cut = match buffer.iter().position(|&b| b == b'\n') {
                Some(pos) => pos + 1,
                None if buffer.len() >= MAX_LINE_BYTES => MAX_LINE_BYTES,
                None => break,
            };
            let line: Vec<u8> = state.partial[index].drain(..cut).collect();
            self.append_line(&mut state, stream, &line);
        }
    }

    /// Writes out any partial lines (a container ended mid-line).
    pub fn flush_partial(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line = std::mem::take(&mut state.partial[stream as usize]);
            if !line.is_empty() {
                self.append_line(&mut state, stream, &line);
            }
        }
    }

    fn append_line(&self, state: &mut LogState, stream: Stream, line: &[u8]) {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let mut record = Vec::with_capacity(content.len() + 48);
        let _ = write!(record, "{} {} F ", Timestamp::now(), stream.name());
        record.extend_from_slice(content);
        record.push(b'\n');
        if state.size + record.len() as u64 > self.max_file_bytes && state.size > 0 {
            self.rotate(state);
        }
        if let Some(file) = state.file.as_mut()
            && file.write_all(&record).is_ok()
        {
            state.size += record.len() as u64;
        }
    }

    fn rotate(&self, state: &mut LogState) {
        state.file = None;
        for i in (1..self.max_files).rev() {
            let from = rotated_path(&self.path, i - 1);
            let _ = std::fs::rename(&from, rotated_path(&self.path, i));
        }
        if self.max_files == 1 {
            let _ = std::fs::remove_file(&self.path);
        }
        state.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        state.size = 0;
    }
}

/// Where a guest's output goes.
pub trait GuestOutput: Send + Sync + 'static {
    /// Raw output of one stream.
    fn write(&self, stream: Stream, bytes: &[u8]);
    /// The guest ended: write out any partial line.
    fn flush_partial(&self);
    /// A line the node itself says about the container (a restart, a kill).
    fn note(&self, text: &str) {
        self.write(Stream::Stderr, format!("[brink] {text}\n").as_bytes());
    }
}

impl GuestOutput for ContainerLog {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        ContainerLog::write(self, stream, bytes)
    }

    fn flush_partial(&self) {
        ContainerLog::flush_partial(self)
    }
}

/// `path` for index 0, `path.N` for rotated file N (higher is older).
fn rotated_path(path: &Path, index: usize) -> PathBuf {
    if index == 0 {
        path.to_path_buf()
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{index}"));
        PathBuf::from(name)
    }
}

/// One stream of a guest's output as an `AsyncWrite` (and so a wasi stdout/stderr).
#[derive(Clone)]
pub struct LogWriter {
    log: Arc<dyn GuestOutput>,
    stream: Stream,
}

impl LogWriter {
    pub fn new(log: Arc<dyn GuestOutput>, stream: Stream) -> Self {
        Self { log, stream }
    }
}

impl AsyncWrite for LogWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.log.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for LogWriter {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogWriter {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// How a reader wants a log.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Only the last N lines.
    pub tail_lines: Option<usize>,
    /// Prefix each line with its RFC 3339 timestamp, as `kubectl logs --timestamps`.
    pub timestamps: bool,
}

/// One stored record, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp: String,
    pub stream: String,
    pub content: String,
}

impl LogLine {
    /// Parses a CRI record; a record that is not one is returned whole as its content.
    pub fn parse(record: &str) -> LogLine {
        let mut parts = record.splitn(4, ' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ts), Some(stream), Some(_tag), Some(content)) => LogLine {
                timestamp: ts.to_string(),
                stream: stream.to_string(),
                content: content.to_string(),
            },
            _ => LogLine {
                timestamp: String::new(),
                stream: String::new(),
                content: record.to_string(),
            },
        }
    }

    pub fn render(&self, timestamps: bool) -> String {
        if timestamps && !self.timestamp.is_empty() {
            format!("{} {}\n", self.timestamp, self.content)
        } else {
            format!("{}\n", self.content)
        }
    }
}

/// Reads every record of a log, oldest rotated file first. Blocking: call from
/// `spawn_blocking`.
pub fn read_all(path: &Path, max_files: usize) -> io::Result<Vec<LogLine>> {
    let mut lines = Vec::new();
    for i in (0..max_files.max(1)).rev() {
        let file = match File::open(rotated_path(path, i)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).lines() {
            let line = line.unwrap_or_else(|e| format!("<unreadable log line: {e}>"));
            lines.push(LogLine::parse(&line));
        }
    }
    Ok(lines)
}

/// The records a query selects, rendered.
pub fn render(lines: &[LogLine], query: &LogQuery) -> String {
    let start = query
        .tail_lines
        .map_or(0, |n| lines.len().saturating_sub(n));
    lines[start..]
        .iter()
        .map(|l| l.render(query.timestamps))
        .collect()
}

/// Reads the records appended after byte `offset` of the current file; returns them and
/// the new offset. A rotation (the file shrank) restarts from its beginning.
pub fn read_from(path: &Path, offset: u64) -> io::Result<(Vec<LogLine>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = if len < offset { 0 } else { offset };
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    // Only whole records; a record being written is picked up next time.
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let text = String::from_utf8_lossy(&buf[..complete]);
    let lines = text.lines().map(LogLine::parse).collect();
    Ok((lines, start + complete as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_stamped_split_and_tailed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path().join("c.log"), 1 << 20, 3).expect("open");
        log.write(Stream::Stdout, b"one\ntw");
        log.write(Stream::Stderr, b"err\n");
        log.write(Stream::Stdout, b"o\nthree");
        log.flush_partial();
        let lines = read_all(log.path(), 3).expect("read");
        let contents: Vec<_> = lines.iter().map(|l| l.content.as_str()).collect();
        assert_eq!(contents, ["one", "err", "two", "three"]);
        assert_eq!(lines[1].stream, "stderr");
        let tail = render(
            &lines,
            &LogQuery {
                tail_lines: Some(2),
                timestamps: false,
            },
        );
        assert_eq!(tail, "two\nthree\n");
        let stamped = render(
            &lines,
            &LogQuery {
                tail_lines: Some(1),
                timestamps: true,
            },
        );
        assert!(
            stamped.ends_with(" three\n") && stamped.len() > 20,
            "{stamped}"
        );
    }

    #[test]
    fn rotation_keeps_the_newest_lines_and_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ContainerLog::open(dir.path().join("c.log"), 200, 3).expect("open");
        for i in 0..100 {
            log.write(Stream::Stdout, format!("line {i}\n").as_bytes());
        }
        let lines = read_all(log.path(), 3).expect("read");
        assert!(lines.len() < 100, "old lines must have been rotated away");
        assert_eq!(lines.last().map(|l| l.content.as_str()), Some("line 99"));
        let files = std::fs::read_dir(dir.path()).expect("dir").count();
        assert!(files <= 3, "{files} files kept");
    }

    #[test]
    fn garbage_records_are_returned_as_text() {
        assert_eq!(LogLine::parse("no-spaces").content, "no-spaces");
    }
}
