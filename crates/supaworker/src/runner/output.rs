//! Captured child output: decoding to Postgres-safe text, secret redaction, and the
//! bounded head-plus-tail log that the caller can read while the job runs.
//!
//! Text leaves this module only after three steps, in this order: invalid UTF-8 becomes
//! U+FFFD (as `String::from_utf8_lossy` does), NUL becomes U+FFFD because Postgres
//! `text` and `jsonb` reject `\u0000`, and every secret becomes `[REDACTED]`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Replacement for a secret in stored output.
pub const REDACTED: &str = "[REDACTED]";

/// Replacement for invalid UTF-8 and for NUL bytes.
const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Minimum length of one line of a multi-line secret for that line to be redacted on
/// its own. Shorter lines (such as a lone `}`) would replace ordinary text.
const MIN_SECRET_LINE_BYTES: usize = 8;

/// Bytes reserved in the log for the omitted-bytes marker. The longest marker, with a
/// 20-digit count and both newlines, is 46 bytes.
const MARKER_RESERVE_BYTES: usize = 64;

/// Minimum length of a partial line that is committed to the log without waiting for
/// its newline, so a child that never prints a newline cannot grow memory without bound.
const MIN_LINE_FLUSH_BYTES: usize = 64 * 1024;

/// Limits on the output kept for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Maximum size in bytes of the stored log, including the omitted-bytes marker.
    /// A quarter goes to the first output (head) and the rest to the latest (tail).
    pub log_max_bytes: usize,
    /// Size in bytes of the stderr-only tail kept for error reports.
    pub stderr_tail_bytes: usize,
}

impl Default for OutputLimits {
    /// 1 MiB of log and 4 KiB of stderr tail.
    fn default() -> Self {
        Self {
            log_max_bytes: 1024 * 1024,
            stderr_tail_bytes: 4 * 1024,
        }
    }
}

/// Replaces known secret values in text with [`REDACTED`].
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Non-empty secrets and long lines of multi-line secrets, longest first so that a
    /// secret that contains another is replaced whole.
    patterns: Vec<String>,
}

impl Redactor {
    /// Builds a redactor for `secrets`. Empty strings are ignored. Each line of a
    /// multi-line secret (such as a PEM key) of at least 8 bytes is also redacted on its
    /// own, because the log may hold such a secret in pieces.
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut patterns = Vec::new();
        for secret in secrets {
            if secret.is_empty() {
                continue;
            }
            if secret.contains('\n') {
                for line in secret.lines() {
                    let line = line.trim();
                    if line.len() >= MIN_SECRET_LINE_BYTES {
                        patterns.push(line.to_owned());
                    }
                }
            }
            patterns.push(secret);
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Self { patterns }
    }

    /// Returns `text` with every secret replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        self.redact_owned(text.to_owned())
    }

    /// Replaces secrets in `text`, reusing its allocation when nothing matches.
    pub(crate) fn redact_owned(&self, mut text: String) -> String {
        for pattern in &self.patterns {
            if text.contains(pattern.as_str()) {
                text = text.replace(pattern.as_str(), REDACTED);
            }
        }
        text
    }

    /// Length in bytes of the longest secret, 0 when there are none.
    pub(crate) fn max_secret_len(&self) -> usize {
        self.patterns.first().map_or(0, String::len)
    }
}

/// Pipe that a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Turns the raw bytes of one pipe into sanitized, redacted text in whole lines.
///
/// Output is held until a newline arrives, so a secret without a newline is always
/// redacted whole, whatever the read sizes. A partial line longer than the flush size
/// is redacted and committed except for its last `max_secret_len - 1` bytes, which
/// stay behind in case they start a secret that the next read completes.
///
/// NOTE: a partial line (such as a progress bar redrawn with `\r`) is not in the live
/// log until its newline, 64 KiB more output, or the end of output arrives.
pub(crate) struct LineAssembler {
    redactor: std::sync::Arc<Redactor>,
    /// Bytes of an incomplete UTF-8 sequence at the end of the previous read.
    utf8_carry: Vec<u8>,
    /// Decoded text not yet committed: the current partial line.
    pending: String,
    flush_bytes: usize,
}

impl LineAssembler {
    pub(crate) fn new(redactor: std::sync::Arc<Redactor>) -> Self {
        let flush_bytes = MIN_LINE_FLUSH_BYTES.max(2 * redactor.max_secret_len());
        Self {
            redactor,
            utf8_carry: Vec::new(),
            pending: String::new(),
            flush_bytes,
        }
    }

    /// Takes one read's bytes and returns the text that is ready to store, if any.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.decode(bytes);

        if let Some(last_newline) = self.pending.rfind('\n') {
            let rest = self.pending.split_off(last_newline + 1);
            let complete = std::mem::replace(&mut self.pending, rest);
            return Some(self.redactor.redact_owned(complete));
        }

        if self.pending.len() > self.flush_bytes {
            // Secrets wholly inside `pending` are replaced here. A secret cut by the end
            // of `pending` starts within its last `max_secret_len - 1` bytes, so those
            // bytes are kept back and redacted again once more output arrives.
            let redacted = self
                .redactor
                .redact_owned(std::mem::take(&mut self.pending));
            let keep = self.redactor.max_secret_len().saturating_sub(1);
            let cut = floor_char_boundary(&redacted, redacted.len().saturating_sub(keep));
            let mut ready = redacted;
            self.pending = ready.split_off(cut);
            return Some(ready);
        }

        None
    }

    /// Returns the remaining text at end of output.
    pub(crate) fn finish(&mut self) -> Option<String> {
        if !self.utf8_carry.is_empty() {
            self.utf8_carry.clear();
            self.pending.push(REPLACEMENT);
        }
        if self.pending.is_empty() {
            return None;
        }
        Some(
            self.redactor
                .redact_owned(std::mem::take(&mut self.pending)),
        )
    }

    /// Appends `bytes` to `pending` as text, keeping an incomplete UTF-8 sequence at the
    /// end for the next read.
    fn decode(&mut self, bytes: &[u8]) {
        let joined;
        let mut rest: &[u8] = if self.utf8_carry.is_empty() {
            bytes
        } else {
            self.utf8_carry.extend_from_slice(bytes);
            joined = std::mem::take(&mut self.utf8_carry);
            &joined
        };

        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    push_without_nul(&mut self.pending, valid);
                    return;
                }
                Err(error) => {
                    let (valid, after) = rest.split_at(error.valid_up_to());
                    push_without_nul(
                        &mut self.pending,
                        std::str::from_utf8(valid).unwrap_or_default(),
                    );
                    match error.error_len() {
                        Some(invalid_len) => {
                            self.pending.push(REPLACEMENT);
                            rest = &after[invalid_len..];
                        }
                        None => {
                            self.utf8_carry = after.to_vec();
                            return;
                        }
                    }
                }
            }
        }
    }
}

fn push_without_nul(out: &mut String, text: &str) {
    if text.contains('\0') {
        out.push_str(&text.replace('\0', "\u{FFFD}"));
    } else {
        out.push_str(text);
    }
}

/// Returns the largest index `<= index` that is a char boundary of `text`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    let mut index = index;
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// Returns the smallest index `>= index` that is a char boundary of `text`.
fn ceil_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    let mut index = index;
    while !text.is_char_boundary(index) {
        index += 1;
    }
    index
}

/// The latest `capacity` bytes of text, trimmed at the front to a char boundary.
#[derive(Debug)]
struct TailRing {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes dropped from the front so far.
    dropped: u64,
}

impl TailRing {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            capacity,
            dropped: 0,
        }
    }

    fn push(&mut self, text: &str) {
        if text.len() >= self.capacity {
            let start = ceil_char_boundary(text, text.len() - self.capacity);
            self.dropped += (self.bytes.len() + start) as u64;
            self.bytes.clear();
            self.bytes.extend(&text.as_bytes()[start..]);
            return;
        }

        self.bytes.extend(text.as_bytes());
        if self.bytes.len() > self.capacity {
            let mut excess = self.bytes.len() - self.capacity;
            // UTF-8 continuation bytes are 0b10xx_xxxx: drop them with their lead byte.
            while self
                .bytes
                .get(excess)
                .is_some_and(|byte| byte & 0xC0 == 0x80)
            {
                excess += 1;
            }
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn append_to(&self, out: &mut String) {
        let (first, second) = self.bytes.as_slices();
        let mut joined = Vec::with_capacity(self.bytes.len());
        joined.extend_from_slice(first);
        joined.extend_from_slice(second);
        // Every push adds whole chars and the front is trimmed to a char boundary, so
        // the lossy path never replaces anything.
        out.push_str(&String::from_utf8_lossy(&joined));
    }

    fn to_text(&self) -> String {
        let mut out = String::with_capacity(self.bytes.len());
        self.append_to(&mut out);
        out
    }
}

/// The first part of the output plus a ring buffer of the latest part, with a marker
/// line in between that counts the bytes dropped.
#[derive(Debug)]
struct BoundedLog {
    head: String,
    head_capacity: usize,
    head_closed: bool,
    tail: TailRing,
}

impl BoundedLog {
    fn new(log_max_bytes: usize) -> Self {
        let head_capacity = log_max_bytes / 4;
        let reserve = MARKER_RESERVE_BYTES.min(log_max_bytes - head_capacity);
        let tail_capacity = log_max_bytes - head_capacity - reserve;
        Self {
            head: String::new(),
            head_capacity,
            head_closed: false,
            tail: TailRing::new(tail_capacity),
        }
    }

    fn push(&mut self, mut text: &str) {
        if !self.head_closed {
            let room = self.head_capacity - self.head.len();
            if text.len() <= room {
                self.head.push_str(text);
                return;
            }
            let cut = floor_char_boundary(text, room);
            self.head.push_str(&text[..cut]);
            self.head_closed = true;
            text = &text[cut..];
        }
        self.tail.push(text);
    }

    fn render(&self, max_bytes: usize) -> String {
        let mut out = String::with_capacity(max_bytes);
        out.push_str(&self.head);
        if self.tail.dropped > 0 {
            // The marker always adds exactly these bytes, so a reader can subtract it
            // to count the output kept.
            out.push_str(&format!("\n[… {} bytes omitted …]\n", self.tail.dropped));
        }
        self.tail.append_to(&mut out);
        if out.len() > max_bytes {
            // Only limits below the marker size get here.
            out.truncate(floor_char_boundary(&out, max_bytes));
        }
        out
    }
}

#[derive(Debug)]
struct Capture {
    limits: OutputLimits,
    log: BoundedLog,
    stderr_tail: TailRing,
}

impl Capture {
    fn new(limits: OutputLimits) -> Self {
        Self {
            limits,
            log: BoundedLog::new(limits.log_max_bytes),
            stderr_tail: TailRing::new(limits.stderr_tail_bytes),
        }
    }
}

/// The output of the running job, shared between the runner and the caller.
///
/// The caller can copy the current log at any time, for example to store progress
/// every few seconds. Each copy is at most `OutputLimits::log_max_bytes` long, and all
/// text in it is already sanitized and redacted. `run` clears it when it starts.
#[derive(Debug)]
pub struct LiveLog {
    capture: Mutex<Capture>,
    version: AtomicU64,
    bytes_received: AtomicU64,
}

impl Default for LiveLog {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveLog {
    pub fn new() -> Self {
        Self {
            capture: Mutex::new(Capture::new(OutputLimits::default())),
            version: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        }
    }

    /// Copies the current log: head, omitted-bytes marker if any, and tail.
    pub fn snapshot(&self) -> String {
        let capture = self.lock();
        capture.log.render(capture.limits.log_max_bytes)
    }

    /// Copies the latest stderr output, up to `OutputLimits::stderr_tail_bytes`.
    pub fn stderr_tail(&self) -> String {
        self.lock().stderr_tail.to_text()
    }

    /// Counter that increases whenever stored output changes. Comparing it with the
    /// value at the last flush shows whether there is anything new to store.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Bytes read from the child's stdout and stderr, before decoding and truncation.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.load(Ordering::Relaxed)
    }

    pub(crate) fn reset(&self, limits: OutputLimits) {
        *self.lock() = Capture::new(limits);
        self.bytes_received.store(0, Ordering::Relaxed);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn count_received(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn commit(&self, stream: Stream, text: &str) {
        if text.is_empty() {
            return;
        }
        {
            let mut capture = self.lock();
            capture.log.push(text);
            if stream == Stream::Stderr {
                capture.stderr_tail.push(text);
            }
        }
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn lock(&self) -> MutexGuard<'_, Capture> {
        // A panic while holding the lock leaves the buffers consistent (each push
        // finishes its own bookkeeping), so a poisoned lock is still usable.
        self.capture
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn assemble(redactor: Redactor, reads: &[&[u8]]) -> String {
        let mut assembler = LineAssembler::new(Arc::new(redactor));
        let mut out = String::new();
        for read in reads {
            if let Some(text) = assembler.push(read) {
                out.push_str(&text);
            }
        }
        if let Some(text) = assembler.finish() {
            out.push_str(&text);
        }
        out
    }

    #[test]
    fn secret_split_at_every_position_is_redacted() {
        let secret = "s3cr3t-t0ken-value";
        let line = format!("auth {secret} done\n");
        for cut in 0..=line.len() {
            let (first, second) = line.as_bytes().split_at(cut);
            let out = assemble(Redactor::new([secret.to_owned()]), &[first, second]);
            assert_eq!(out, "auth [REDACTED] done\n", "cut at byte {cut}");
        }
    }

    #[test]
    fn secret_across_partial_line_flush_is_redacted() {
        let secret = "abcdefghijklmnopqrstuvwxyz0123456789";
        let filler = "x".repeat(MIN_LINE_FLUSH_BYTES - 10);
        let text = format!("{filler}{secret}{filler}");
        // Reads of 7 bytes put the flush point inside the secret at some read.
        let reads: Vec<&[u8]> = text.as_bytes().chunks(7).collect();
        let out = assemble(Redactor::new([secret.to_owned()]), &reads);
        assert!(!out.contains("abcdefgh"), "secret prefix leaked");
        assert!(!out.contains("0123456789"), "secret suffix leaked");
        assert_eq!(out, format!("{filler}[REDACTED]{filler}"));
    }

    #[test]
    fn multi_line_secret_lines_redacted_alone() {
        let secret = "-----BEGIN KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC\n-----END KEY-----";
        let redactor = Redactor::new([secret.to_owned()]);
        assert_eq!(redactor.redact(secret), "[REDACTED]");
        assert_eq!(
            redactor.redact("line: MIIBVQIBADANBgkqhkiG9w0BAQEFAASC"),
            "line: [REDACTED]"
        );
    }

    #[test]
    fn longer_secret_replaced_whole() {
        let redactor = Redactor::new(["abc123".to_owned(), "abc123xyz".to_owned()]);
        assert_eq!(redactor.redact("v=abc123xyz"), "v=[REDACTED]");
    }

    #[test]
    fn utf8_split_across_reads_is_kept() {
        let euro = "€".as_bytes();
        let out = assemble(Redactor::default(), &[&euro[..1], &euro[1..2], &euro[2..]]);
        assert_eq!(out, "€");
    }

    #[test]
    fn invalid_utf8_and_nul_replaced() {
        let out = assemble(Redactor::default(), &[b"a\xffb\0c\n", b"\xe2\x82"]);
        assert_eq!(out, "a\u{FFFD}b\u{FFFD}c\n\u{FFFD}");
    }

    #[test]
    fn bounded_log_counts_omitted_bytes() {
        let mut log = BoundedLog::new(1000);
        let mut total = 0;
        for i in 0..500 {
            let line = format!("line {i:04}\n");
            total += line.len();
            log.push(&line);
        }
        let text = log.render(1000);
        assert!(text.len() <= 1000, "log is {} bytes", text.len());
        assert!(text.starts_with("line 0000\n"));
        assert!(text.ends_with("line 0499\n"));

        let marker_start = text.find("\n[… ").expect("marker present");
        let marker_end = marker_start + 1 + text[marker_start + 1..].find('\n').unwrap() + 1;
        let omitted: usize = text[marker_start..marker_end]
            .trim_start_matches("\n[… ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let kept = text.len() - (marker_end - marker_start);
        assert_eq!(kept + omitted, total);
    }

    #[test]
    fn truncation_keeps_whole_chars() {
        let mut log = BoundedLog::new(333);
        for _ in 0..1000 {
            log.push("€ü");
        }
        let text = log.render(333);
        assert!(text.len() <= 333);
        assert!(!text.contains('\u{FFFD}'));
    }

    #[test]
    fn tiny_limits_do_not_panic() {
        for max in 0..80 {
            let mut log = BoundedLog::new(max);
            log.push("hello world, this is more than a few bytes\n");
            log.push("€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€€\n");
            assert!(log.render(max).len() <= max);
        }
    }
}
