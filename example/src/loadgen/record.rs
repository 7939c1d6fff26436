//! The event record of a load run (`xds-loadgen --record PATH`): one JSON object per line for
//! every stream opened, every response received and every stream that ended, so that a test
//! harness can check ordering invariants per client across reconnects and relays.
//!
//! Format (see `chaos-tests/README.md`, "Record format"):
//!
//! ```json
//! {"t":1795321954411.2,"node":"r1-3","event":"connect","stream":1}
//! {"t":1795321954420.7,"node":"r1-3","event":"response","type":"cds","version":"17953","resources":3,"stream":1}
//! {"t":1795321960001.0,"node":"r1-3","event":"disconnect","stream":1,"code":"UNAVAILABLE","message":"relay draining"}
//! ```
//!
//! Invariants: the calls never wait for the file (events go through an unbounded queue to one
//! writer task); events of one call are written in the order they happened; the file is
//! flushed at least every [`FLUSH_INTERVAL`] while events arrive, and completely when the
//! recorder is closed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::config::XdsType;

/// The longest an event waits in the writer's buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Errors of [`Recorder::create`].
#[derive(Debug, thiserror::Error)]
#[error("cannot open the record file {path}")]
pub struct RecordError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// What happened to a stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A stream opened (every connect after a client's first is a reconnect).
    Connect,
    /// A response arrived.
    Response {
        /// The response's type; `None` for a type the call does not carry.
        #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
        xds_type: Option<XdsType>,
        /// `version_info` (SotW) or `system_version_info` (delta).
        version: String,
        /// Resources in the response (SotW) or held for the type after applying it (delta).
        resources: usize,
    },
    /// A stream ended, or could not open.
    Disconnect {
        /// The gRPC status code name, e.g. `UNAVAILABLE` (`OK` for a clean close).
        code: String,
        /// The status message.
        message: String,
    },
}

/// One line of the record.
#[derive(Debug, Serialize)]
struct Line<'a> {
    /// Unix milliseconds.
    t: f64,
    node: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    /// The type of a per-type call, on connect and disconnect.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    call_type: Option<XdsType>,
    /// The client's stream ordinal, from 1.
    stream: u64,
}

/// An event with what the line needs besides it.
#[derive(Debug)]
struct Entry {
    t: f64,
    node: Arc<str>,
    call_type: Option<XdsType>,
    stream: u64,
    event: Event,
}

/// Where the calls send their events; cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Entry>,
}

/// The writer task of a [`Recorder`]; [`RecordWriter::close`] flushes and ends it.
#[derive(Debug)]
pub struct RecordWriter {
    task: JoinHandle<std::io::Result<()>>,
}

// === impl Recorder ===

impl Recorder {
    /// Creates (truncates) `path` and starts the writer task.
    ///
    /// # Errors
    ///
    /// [`RecordError`] when the file cannot be created.
    pub fn create(path: &Path) -> Result<(Self, RecordWriter), RecordError> {
        let file = std::fs::File::create(path).map_err(|source| RecordError { path: path.to_owned(), source })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::task::spawn_blocking(move || write_lines(std::io::BufWriter::new(file), rx));
        Ok((Self { tx }, RecordWriter { task }))
    }

    /// Records `event` of stream `stream` of client `node` now; `call_type` names the type of a
    /// per-type call. Never blocks; dropped once the writer has closed.
    pub fn record(&self, node: &Arc<str>, call_type: Option<XdsType>, stream: u64, event: Event) {
        let entry = Entry { t: unix_millis(SystemTime::now()), node: node.clone(), call_type, stream, event };
        let _ = self.tx.send(entry);
    }
}

// === impl RecordWriter ===

impl RecordWriter {
    /// Waits until every recorder is dropped and every event written, then flushes.
    ///
    /// # Errors
    ///
    /// The first write error, if any.
    pub async fn close(self) -> std::io::Result<()> {
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Writes every entry as a line, flushing at least every [`FLUSH_INTERVAL`], until every
/// sender is gone.
fn write_lines(mut out: impl std::io::Write, mut rx: mpsc::UnboundedReceiver<Entry>) -> std::io::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    let mut first_error = None;
    loop {
        // Block for the next entry, or flush what is buffered when none comes in time.
        let next = runtime.block_on(async { tokio::time::timeout(FLUSH_INTERVAL, rx.recv()).await });
        match next {
            Ok(Some(entry)) => {
                if let Err(e) = write_entry(&mut out, &entry) {
                    first_error.get_or_insert(e);
                }
                while let Ok(entry) = rx.try_recv() {
                    if let Err(e) = write_entry(&mut out, &entry) {
                        first_error.get_or_insert(e);
                    }
                }
                if let Err(e) = out.flush() {
                    first_error.get_or_insert(e);
                }
            }
            Ok(None) => break,
            Err(_elapsed) => {}
        }
    }
    out.flush()?;
    first_error.map_or(Ok(()), Err)
}

fn write_entry(out: &mut impl std::io::Write, entry: &Entry) -> std::io::Result<()> {
    let line =
        Line { t: entry.t, node: &entry.node, event: &entry.event, call_type: entry.call_type, stream: entry.stream };
    serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

/// Unix milliseconds with microsecond resolution.
fn unix_millis(time: SystemTime) -> f64 {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_micros() as f64) / 1000.0
}

/// The upper-case name of a gRPC status code, as the record writes it.
pub fn code_name(code: tonic::Code) -> String {
    let name = match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[tokio::test]
    async fn writes_one_line_per_event_in_order_and_flushes_while_running() {
        let dir = std::env::temp_dir().join(format!("xds-loadgen-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        let (recorder, writer) = Recorder::create(&path).unwrap();
        let node: Arc<str> = Arc::from("r1-3");
        recorder.record(&node, None, 1, Event::Connect);
        recorder.record(
            &node,
            None,
            1,
            Event::Response { xds_type: Some(XdsType::Cds), version: "17".into(), resources: 3 },
        );
        // Flushed while the run goes on, within a few flush intervals.
        let mut lines = Vec::new();
        for _ in 0..50 {
            tokio::time::sleep(FLUSH_INTERVAL).await;
            lines = read(&path);
            if lines.len() == 2 {
                break;
            }
        }
        assert_eq!(lines.len(), 2, "flushed while running");
        recorder.record(
            &node,
            Some(XdsType::Eds),
            1,
            Event::Disconnect { code: code_name(tonic::Code::Unavailable), message: "relay draining".into() },
        );
        drop(recorder);
        writer.close().await.unwrap();

        let lines = read(&path);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "connect");
        assert_eq!(lines[0]["node"], "r1-3");
        assert_eq!(lines[0]["stream"], 1);
        assert!(lines[0].get("type").is_none());
        assert_eq!(lines[1]["event"], "response");
        assert_eq!(
            (&lines[1]["type"], &lines[1]["version"], &lines[1]["resources"]),
            (&"cds".into(), &"17".into(), &3.into())
        );
        assert_eq!(lines[2]["event"], "disconnect");
        assert_eq!((&lines[2]["code"], &lines[2]["type"]), (&"UNAVAILABLE".into(), &"eds".into()));
        let t: Vec<f64> = lines.iter().map(|l| l["t"].as_f64().unwrap()).collect();
        assert!(t.windows(2).all(|w| w[0] <= w[1]) && t[0] > 1.7e12, "{t:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unwritable_path_names_the_file() {
        let error = Recorder::create(Path::new("/nonexistent-dir/x.jsonl")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent-dir/x.jsonl"), "{error}");
    }
}
