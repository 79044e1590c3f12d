//! A job's logs: the files of its `logs/` folder, read and followed.
//!
//! Every job writes `<out>/logs/`: `controller.log`, the runner's record of the job's events
//! ([`crate::runner::ControllerLog`]), and one file per worker process, `<role>-<i>.log` (its
//! stderr). The local launcher writes them there, and so do pool workers on other machines: the
//! coordinator sets each assignment's `log_path` to `<out>/logs/<role>-<i>.log` on the
//! filesystem it shares with its workers. So the folder alone holds every source; a source is
//! the file's name without `.log` (`controller`, `actor-0`, `learner-1`, …).
//!
//! [`Follower`] reads the files in pieces (bounded memory whatever their size): lines appended
//! since its last read, a line longer than [`MAX_LINE`] bytes split into pieces, files that
//! appear later (a relaunched worker) picked up. [`stream`] drives it on a runtime: everything
//! there is (or the last `tail` lines of each source), then, when following, new lines as they
//! are written until the job has ended.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

/// The controller's source name (its file is `controller.log`).
pub const CONTROLLER: &str = "controller";
/// The longest piece of a line handed out at once; a longer line comes in several pieces.
pub const MAX_LINE: usize = 64 * 1024;
/// Bytes read from the files per [`Follower::read`] call.
const READ_BUDGET: usize = 1 << 20;
/// How often files are looked at again while following.
const POLL: Duration = Duration::from_millis(250);

/// One line (or one piece of a long line) of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub source: String,
    pub line: String,
}

/// The log folder of a job whose output folder is `out`.
pub fn folder(out: &Path) -> PathBuf {
    out.join("logs")
}

/// The `*.log` files of `dir` as (source, path): the controller first, then by role and index
/// (`actor-2` before `actor-10`). A missing folder has none (the job has not started).
pub fn sources(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(source) = name.strip_suffix(".log")
            && !source.is_empty()
            && path.is_file()
        {
            found.push((source.to_string(), path.clone()));
        }
    }
    found.sort_by_key(|(source, _)| order_key(source));
    Ok(found)
}

/// Sorts the controller first, then `role-index` names by role and numeric index.
fn order_key(source: &str) -> (bool, String, u64, String) {
    let (role, index) = match source.rsplit_once('-') {
        Some((role, i)) if i.parse::<u64>().is_ok() => (role, i.parse().unwrap_or(0)),
        _ => (source, 0),
    };
    (
        source != CONTROLLER,
        role.to_string(),
        index,
        source.to_string(),
    )
}

/// Where one source has been read to.
#[derive(Debug)]
struct Source {
    name: String,
    path: PathBuf,
    offset: u64,
    /// The start of a line whose end has not been written yet.
    pending: Vec<u8>,
}

/// Reads a log folder incrementally. Blocking file I/O: call it off the async threads.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    /// Lines kept of each source found by the first read (0: all).
    tail: usize,
    scanned: bool,
    sources: Vec<Source>,
}

impl Follower {
    /// Reads `dir`, starting at the last `tail` lines of each file there now (0: all of
    /// them). Files that appear later are read from their start.
    pub fn new(dir: PathBuf, tail: usize) -> Follower {
        Follower {
            dir,
            tail,
            scanned: false,
            sources: Vec::new(),
        }
    }

    /// The lines written since the last call, source by source, after reading at most about
    /// a megabyte (call again while it returns lines). A last line without its newline is
    /// held back until the newline comes, unless `finish` (nothing more will be written).
    pub fn read(&mut self, finish: bool) -> io::Result<Vec<LogLine>> {
        self.scan()?;
        let mut lines = Vec::new();
        let mut budget = READ_BUDGET;
        for source in &mut self.sources {
            if budget == 0 {
                break;
            }
            budget = budget.saturating_sub(source.read(budget, &mut lines)?);
            if finish && budget > 0 && !source.pending.is_empty() {
                let piece = std::mem::take(&mut source.pending);
                lines.push(source.line(&piece));
            }
        }
        Ok(lines)
    }

    /// Adds the files that are new since the last scan.
    fn scan(&mut self) -> io::Result<()> {
        for (name, path) in sources(&self.dir)? {
            if self.sources.iter().any(|s| s.name == name) {
                continue;
            }
            let offset = if self.scanned {
                0
            } else {
                tail_offset(&path, self.tail)?
            };
            self.sources.push(Source {
                name,
                path,
                offset,
                pending: Vec::new(),
            });
        }
        self.sources.sort_by_key(|s| order_key(&s.name));
        self.scanned = true;
        Ok(())
    }
}

impl Source {
    fn line(&self, bytes: &[u8]) -> LogLine {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        LogLine {
            source: self.name.clone(),
            line: String::from_utf8_lossy(bytes).into_owned(),
        }
    }

    /// Reads up to `budget` new bytes into complete lines; returns the bytes read.
    fn read(&mut self, budget: usize, lines: &mut Vec<LogLine>) -> io::Result<usize> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            // Removed since the scan: nothing to read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // Truncated (or replaced): read it again from its start.
            self.offset = 0;
            self.pending.clear();
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut chunk = vec![0u8; budget.min(MAX_LINE)];
        let mut total = 0;
        while total < budget {
            let want = (budget - total).min(chunk.len());
            let n = file.read(&mut chunk[..want])?;
            if n == 0 {
                break;
            }
            total += n;
            self.offset += n as u64;
            let mut rest = &chunk[..n];
            while let Some(end) = rest.iter().position(|b| *b == b'\n') {
                self.pending.extend_from_slice(&rest[..end]);
                rest = &rest[end + 1..];
                let whole = std::mem::take(&mut self.pending);
                for piece in split_long(&whole) {
                    lines.push(self.line(piece));
                }
            }
            self.pending.extend_from_slice(rest);
            // An endless line is handed out in pieces, not held in memory.
            while self.pending.len() > MAX_LINE {
                let cut = char_boundary(&self.pending, MAX_LINE);
                let piece: Vec<u8> = self.pending.drain(..cut).collect();
                lines.push(self.line(&piece));
            }
        }
        Ok(total)
    }
}

/// `line` in pieces of at most [`MAX_LINE`] bytes, cut between UTF-8 characters.
fn split_long(line: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut rest = line;
    while rest.len() > MAX_LINE {
        let cut = char_boundary(rest, MAX_LINE);
        pieces.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    pieces.push(rest);
    pieces
}

/// The largest cut ≤ `max` that does not split a UTF-8 character (continuation bytes are
/// `0b10xx_xxxx`); `max` itself when the bytes are not UTF-8 there.
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    let max = max.min(bytes.len());
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&i| i == bytes.len() || bytes[i] & 0xC0 != 0x80)
        .filter(|&i| i > 0)
        .unwrap_or(max)
}

/// The offset where the last `n` lines of a file start (0: the whole file), found by reading
/// backwards in chunks. A final newline ends the last line, it does not start another.
pub fn tail_offset(path: &Path, n: usize) -> io::Result<u64> {
    if n == 0 {
        return Ok(0);
    }
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut chunk = vec![0u8; MAX_LINE];
    let (mut end, mut seen) = (len, 0);
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(buf)?;
        for (i, b) in buf.iter().enumerate().rev() {
            let at = start + i as u64;
            if *b == b'\n' && at + 1 != len {
                seen += 1;
                if seen == n {
                    return Ok(at + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

/// What to stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamOptions {
    /// Keep reading new lines until the job has ended.
    pub follow: bool,
    /// Only the last `tail` lines of each source before following (0: all).
    pub tail: usize,
}

/// Sends the lines of log folder `dir` to `tx`: what is there (or its tail), then, with
/// `follow`, lines as they are written, looking at the files every 250 ms; when nothing is new
/// it asks `ended` whether the job has reached a final state, and once it has, reads what is
/// left and returns. Returns early, without error, when the receiver is dropped (a client that
/// went away).
pub async fn stream<F, Fut>(
    dir: PathBuf,
    options: StreamOptions,
    mut ended: F,
    tx: mpsc::Sender<LogLine>,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let mut follower = Follower::new(dir, options.tail);
    let mut finish = !options.follow;
    loop {
        let (back, lines) = tokio::task::spawn_blocking(move || {
            let lines = follower.read(finish);
            (follower, lines)
        })
        .await
        .context("the log reader")?;
        follower = back;
        let lines = lines.context("reading the job's logs")?;
        if !lines.is_empty() {
            for line in lines {
                if tx.send(line).await.is_err() {
                    return Ok(());
                }
            }
            continue;
        }
        if finish || tx.is_closed() {
            return Ok(());
        }
        if ended().await? {
            // The job's last lines were written before its final state: one more pass.
            finish = true;
            continue;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A tracing JSON line (`--log-format json`) said readably, as tracing's text format would:
/// `TIME LEVEL span{k=v}:span: target: message key=value…`; `None` for anything else (text
/// lines are readable already).
pub fn readable(line: &str) -> Option<String> {
    let serde_json::Value::Object(o) = serde_json::from_str(line.trim()).ok()? else {
        return None;
    };
    let level = o.get("level")?.as_str()?;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    if let Some(t) = o.get("timestamp").and_then(|t| t.as_str()) {
        out.push_str(t);
        out.push(' ');
    }
    out.push_str(&format!("{level:>5} "));
    // As tracing's text format shows them: `outer{k=v}:inner{k=v}: `.
    if let Some(spans) = o.get("spans").and_then(|s| s.as_array()) {
        for span in spans.iter().filter_map(|s| s.as_object()) {
            out.push_str(span.get("name").and_then(|n| n.as_str()).unwrap_or("?"));
            let fields: Vec<String> = span
                .iter()
                .filter(|(k, _)| *k != "name")
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect();
            if !fields.is_empty() {
                out.push_str(&format!("{{{}}}", fields.join(" ")));
            }
            out.push(':');
        }
        if !spans.is_empty() {
            out.push(' ');
        }
    }
    if let Some(target) = o.get("target").and_then(|t| t.as_str()) {
        out.push_str(target);
        out.push_str(": ");
    }
    let fields = o.get("fields").and_then(|f| f.as_object());
    if let Some(message) = fields.and_then(|f| f.get("message")) {
        out.push_str(&text(message));
    }
    for (k, v) in fields.into_iter().flatten() {
        if k != "message" {
            out.push_str(&format!(" {k}={}", text(v)));
        }
    }
    Some(out.trim_end().to_string())
}

/// Unix seconds as an RFC 3339 UTC time with milliseconds, `2026-12-01T09:30:00.250Z`.
pub fn utc_timestamp(unix: f64) -> String {
    let millis = (unix * 1000.0).round() as i64;
    let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
// Howard Hinnant, "chrono-Compatible Low-Level Date Algorithms", `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    fn texts(lines: &[LogLine]) -> Vec<String> {
        lines
            .iter()
            .map(|l| format!("[{}] {}", l.source, l.line))
            .collect()
    }

    #[test]
    fn sources_put_the_controller_first_then_roles_by_index() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "actor-10.log",
            "actor-2.log",
            "controller.log",
            "learner-0.log",
            "notes.txt",
            "reward-0.log",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let names: Vec<String> = sources(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            names,
            ["controller", "actor-2", "actor-10", "learner-0", "reward-0"]
        );
        assert!(sources(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn the_follower_hands_out_new_complete_lines_and_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let actor = dir.path().join("actor-0.log");
        append(&actor, "one\ntwo\nthr");
        let mut f = Follower::new(dir.path().to_path_buf(), 0);
        assert_eq!(
            texts(&f.read(false).unwrap()),
            ["[actor-0] one", "[actor-0] two"]
        );
        assert!(f.read(false).unwrap().is_empty(), "nothing new");
        append(&actor, "ee\r\nfour");
        append(&dir.path().join("controller.log"), "state running\n");
        assert_eq!(
            texts(&f.read(false).unwrap()),
            ["[controller] state running", "[actor-0] three"]
        );
        // At the end, the unterminated last line comes out too.
        assert_eq!(texts(&f.read(true).unwrap()), ["[actor-0] four"]);
        assert!(f.read(true).unwrap().is_empty());
    }

    #[test]
    fn a_truncated_file_is_read_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("reward-0.log");
        append(&log, "a long first life\n");
        let mut f = Follower::new(dir.path().to_path_buf(), 0);
        assert_eq!(f.read(false).unwrap().len(), 1);
        std::fs::write(&log, "new\n").unwrap();
        assert_eq!(texts(&f.read(false).unwrap()), ["[reward-0] new"]);
    }

    #[test]
    fn tail_keeps_the_last_lines_of_each_file_present_at_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        append(&dir.path().join("actor-0.log"), &text);
        append(&dir.path().join("learner-0.log"), "only\n");
        append(&dir.path().join("reward-0.log"), "x\ny");
        let mut f = Follower::new(dir.path().to_path_buf(), 2);
        assert_eq!(
            texts(&f.read(true).unwrap()),
            [
                "[actor-0] line 998",
                "[actor-0] line 999",
                "[learner-0] only",
                "[reward-0] x",
                "[reward-0] y"
            ]
        );
        // A file that appears later is new: all of it.
        append(&dir.path().join("actor-1.log"), "a\nb\nc\n");
        assert_eq!(f.read(true).unwrap().len(), 3);
        // Across the backward-reading chunks.
        let big: String = (0..20_000).map(|i| format!("{i:08}\n")).collect();
        let path = dir.path().join("big.log");
        append(&path, &big);
        let at = tail_offset(&path, 10_000).unwrap();
        assert_eq!(at, 10_000 * 9);
        assert_eq!(tail_offset(&path, 30_000).unwrap(), 0);
        assert_eq!(tail_offset(&path, 0).unwrap(), 0);
    }

    #[test]
    fn long_lines_are_split_without_breaking_characters() {
        let dir = tempfile::tempdir().unwrap();
        // 'é' is two bytes: an odd prefix puts a character across every MAX_LINE boundary.
        let long = format!("x{}", "é".repeat(MAX_LINE));
        append(&dir.path().join("actor-0.log"), &format!("{long}\nshort\n"));
        let mut f = Follower::new(dir.path().to_path_buf(), 0);
        let mut lines = Vec::new();
        loop {
            let batch = f.read(false).unwrap();
            if batch.is_empty() {
                break;
            }
            lines.extend(batch);
        }
        assert!(lines.len() >= 3, "{} pieces", lines.len());
        assert!(lines.iter().all(|l| l.line.len() <= MAX_LINE));
        assert!(lines.iter().all(|l| !l.line.contains('\u{FFFD}')));
        let (pieces, last) = lines.split_at(lines.len() - 1);
        let joined: String = pieces.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(joined, long);
        assert_eq!(last[0].line, "short");
    }

    #[test]
    fn an_endless_line_is_handed_out_in_pieces_while_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("actor-0.log");
        append(&log, &"y".repeat(3 * MAX_LINE + 5));
        let mut f = Follower::new(dir.path().to_path_buf(), 0);
        let lines = f.read(false).unwrap();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.line.len() == MAX_LINE));
        assert_eq!(f.read(true).unwrap()[0].line, "yyyyy");
    }

    #[test]
    fn json_lines_become_readable_and_text_lines_stay() {
        let json = r#"{"timestamp":"2026-12-01T09:30:00.250000Z","level":"INFO","fields":{"message":"listening","addr":"127.0.0.1:5","n":3},"target":"rlhf_actor::server","spans":[{"name":"serve"},{"name":"step","step":2}]}"#;
        assert_eq!(
            readable(json).unwrap(),
            "2026-12-01T09:30:00.250000Z  INFO serve:step{step=2}: rlhf_actor::server: listening addr=127.0.0.1:5 n=3"
        );
        assert_eq!(
            readable(r#"{"level":"WARN","fields":{"message":"slow"}}"#).unwrap(),
            " WARN slow"
        );
        assert_eq!(readable("2026-12-01T09:30:00Z  INFO text line"), None);
        assert_eq!(readable(r#"{"no":"level"}"#), None);
        assert_eq!(readable("[1, 2]"), None);
    }

    #[test]
    fn utc_timestamps_follow_the_calendar() {
        assert_eq!(utc_timestamp(0.0), "1970-01-01T00:00:00.000Z");
        // A leap day, and the last millisecond of a year.
        assert_eq!(utc_timestamp(951_782_400.0), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc_timestamp(1_767_225_599.999), "2025-12-31T23:59:59.999Z");
        assert_eq!(utc_timestamp(1_764_581_400.25), "2025-12-01T09:30:00.250Z");
        assert_eq!(utc_timestamp(-1.0), "1969-12-31T23:59:59.000Z");
    }
}
