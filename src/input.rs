//! Parsing what `litework add` reads.
//!
//! Three formats, all streamed (memory does not grow with the input):
//!
//! - `lines`: one UTF-8 payload per line; `\n` or `\r\n` ends a line and
//!   empty lines are skipped.
//! - `jsonl`: one JSON object per line with `payload` (a string, or any
//!   other JSON value, stored as its JSON text) or `payload_base64` (raw
//!   bytes), and optionally `key`, `priority`, `max_attempts`, `delay`.
//! - `nul`: records separated by NUL bytes, kept byte-for-byte (the output
//!   of `find -print0`); any bytes but NUL.
//!
//! A malformed record is an error naming the input and its line (record)
//! number; the caller adds nothing of that input.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::queue::NewItem;

/// The input formats of `litework add`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Lines,
    Jsonl,
    Nul,
}

/// Settings applied to every record that does not set its own.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Use the payload as the dedupe key of records without a key.
    pub key_from_payload: bool,
    pub priority: i64,
    pub max_attempts: Option<u32>,
    pub delay: Option<Duration>,
    /// Longest record accepted, in bytes.
    pub max_record: usize,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            key_from_payload: false,
            priority: 0,
            max_attempts: None,
            delay: None,
            max_record: 16 * 1024 * 1024,
        }
    }
}

/// An iterator of parsed records over a reader.
pub struct Records<R> {
    reader: R,
    name: String,
    format: Format,
    defaults: Defaults,
    line: u64,
    buf: Vec<u8>,
    failed: bool,
}

impl<R: BufRead> Records<R> {
    /// `name` is how errors refer to the input: a path, or `<stdin>`.
    pub fn new(reader: R, name: impl Into<String>, format: Format, defaults: Defaults) -> Self {
        Records {
            reader,
            name: name.into(),
            format,
            defaults,
            line: 0,
            buf: Vec::new(),
            failed: false,
        }
    }

    fn error(&mut self, reason: impl Into<String>) -> Error {
        self.failed = true;
        Error::Input {
            input: self.name.clone(),
            line: self.line,
            reason: reason.into(),
        }
    }

    fn next_record(&mut self) -> Result<Option<NewItem>> {
        let delim = if self.format == Format::Nul { 0 } else { b'\n' };
        loop {
            self.buf.clear();
            self.line += 1;
            let read = read_bounded(
                &mut self.reader,
                delim,
                self.defaults.max_record,
                &mut self.buf,
            );
            match read {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(ReadError::TooLong) => {
                    let limit = self.defaults.max_record;
                    return Err(self.error(format!("record longer than the {limit}-byte limit")));
                }
                Err(ReadError::Io(source)) => {
                    self.failed = true;
                    return Err(Error::InputIo {
                        input: self.name.clone(),
                        source,
                    });
                }
            }
            if self.buf.last() == Some(&delim) {
                self.buf.pop();
            }
            if self.format != Format::Nul && self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            // The reader bounds memory with some slack for the delimiter;
            // the limit itself applies to the record as stored.
            if self.buf.len() > self.defaults.max_record {
                let limit = self.defaults.max_record;
                return Err(self.error(format!("record longer than the {limit}-byte limit")));
            }
            if self.buf.is_empty() {
                continue;
            }
            let (item, has_priority) = match self.format {
                Format::Nul => (NewItem::new(self.buf.clone()), false),
                Format::Lines => match std::str::from_utf8(&self.buf) {
                    Ok(s) => (NewItem::new(s.as_bytes().to_vec()), false),
                    Err(e) => {
                        let at = e.valid_up_to();
                        return Err(self.error(format!(
                            "not valid UTF-8 (at byte {at}); use --format nul for raw bytes, \
                             or jsonl with payload_base64"
                        )));
                    }
                },
                Format::Jsonl => {
                    let parsed = parse_json(&self.buf);
                    parsed.map_err(|reason| self.error(reason))?
                }
            };
            return Ok(Some(self.apply_defaults(item, has_priority)));
        }
    }

    fn apply_defaults(&self, mut item: NewItem, has_priority: bool) -> NewItem {
        item.key_from_payload = self.defaults.key_from_payload;
        if !has_priority {
            item.priority = self.defaults.priority;
        }
        item.max_attempts = item.max_attempts.or(self.defaults.max_attempts);
        item.delay = item.delay.or(self.defaults.delay);
        item
    }
}

impl<R: BufRead> Iterator for Records<R> {
    type Item = Result<NewItem>;

    fn next(&mut self) -> Option<Result<NewItem>> {
        if self.failed {
            return None;
        }
        self.next_record().transpose()
    }
}

/// One JSON Lines record, and whether it set its own priority.
fn parse_json(line: &[u8]) -> std::result::Result<(NewItem, bool), String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("expected a JSON object with a \"payload\" field".into());
    };
    let mut item = NewItem::new(Vec::new());
    let mut payload = None;
    let mut has_priority = false;
    for (field, v) in map {
        match field.as_str() {
            "payload" => {
                let bytes = match v {
                    Value::String(s) => s.into_bytes(),
                    Value::Null => return Err("\"payload\" is null".into()),
                    other => other.to_string().into_bytes(),
                };
                if payload.replace(bytes).is_some() {
                    return Err("both \"payload\" and \"payload_base64\" given".into());
                }
            }
            "payload_base64" => {
                let s = v.as_str().ok_or("\"payload_base64\" must be a string")?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| format!("\"payload_base64\" is not base64: {e}"))?;
                if payload.replace(bytes).is_some() {
                    return Err("both \"payload\" and \"payload_base64\" given".into());
                }
            }
            "key" => match v {
                Value::String(s) => item.key = Some(s),
                Value::Null => {}
                Value::Number(n) => item.key = Some(n.to_string()),
                _ => return Err("\"key\" must be a string".into()),
            },
            "priority" => {
                item.priority = v.as_i64().ok_or("\"priority\" must be an integer")?;
                has_priority = true;
            }
            "max_attempts" => {
                let n = v
                    .as_u64()
                    .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
                    .ok_or("\"max_attempts\" must be an integer of at least 1")?;
                item.max_attempts = Some(n as u32);
            }
            "delay" => {
                let d = match &v {
                    // Negative or past what a Duration holds (1e20): refused.
                    Value::Number(n) => {
                        n.as_f64().and_then(|s| Duration::try_from_secs_f64(s).ok())
                    }
                    Value::String(s) => humantime::parse_duration(s).ok(),
                    _ => None,
                };
                item.delay = Some(d.ok_or("\"delay\" must be seconds or a duration like \"5m\"")?);
            }
            other => {
                return Err(format!(
                    "unknown field {other:?} (known: payload, payload_base64, key, priority, \
                     max_attempts, delay)"
                ))
            }
        }
    }
    item.payload = payload.ok_or("missing \"payload\" (or \"payload_base64\") field")?;
    Ok((item, has_priority))
}

enum ReadError {
    TooLong,
    Io(std::io::Error),
}

/// Reads up to and including `delim` into `buf`, failing once the record
/// exceeds `limit` bytes instead of buffering it whole. Returns the number
/// of bytes read, 0 at end of input.
fn read_bounded<R: BufRead>(
    reader: &mut R,
    delim: u8,
    limit: usize,
    buf: &mut Vec<u8>,
) -> std::result::Result<usize, ReadError> {
    let mut total = 0;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if available.is_empty() {
            return Ok(total);
        }
        let (used, found) = match available.iter().position(|&b| b == delim) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if buf.len() + used > limit + 2 {
            return Err(ReadError::TooLong);
        }
        buf.extend_from_slice(&available[..used]);
        reader.consume(used);
        total += used;
        if found {
            return Ok(total);
        }
    }
}

/// An input read to its end and checked, kept in an unnamed file until it
/// is added: `litework add` to an existing queue takes the write lock only
/// once the whole input is in, so that a slow producer cannot hold every
/// worker up. Memory stays flat; the file is removed from its directory
/// as soon as it is made, so nothing is left behind whatever happens.
pub struct Spool {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    items: u64,
}

impl Spool {
    /// Reads `records` into a new spool file in `dir`, stopping at the
    /// first bad record and returning its error.
    pub fn fill<I>(dir: &Path, records: I) -> Result<Spool>
    where
        I: IntoIterator<Item = Result<NewItem>>,
    {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(format!(
            ".litework-spool-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let fail = |source| spool_error(&path, source);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(fail)?;
        std::fs::remove_file(&path).map_err(fail)?;
        let mut spool = Spool {
            file: std::io::BufWriter::with_capacity(256 * 1024, file),
            path: path.clone(),
            items: 0,
        };
        for item in records {
            spool.push(&item?).map_err(fail)?;
        }
        Ok(spool)
    }

    /// Items read.
    pub fn len(&self) -> u64 {
        self.items
    }

    /// Returns true if and only if the input held no items.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    fn push(&mut self, item: &NewItem) -> std::io::Result<()> {
        use std::io::Write;
        let f = &mut self.file;
        let bytes = |f: &mut std::io::BufWriter<std::fs::File>, b: &[u8]| {
            f.write_all(&(b.len() as u64).to_le_bytes())?;
            f.write_all(b)
        };
        bytes(f, &item.payload)?;
        match &item.key {
            Some(k) => {
                f.write_all(&[1])?;
                bytes(f, k.as_bytes())?;
            }
            None => f.write_all(&[0])?,
        }
        f.write_all(&[u8::from(item.key_from_payload)])?;
        f.write_all(&item.priority.to_le_bytes())?;
        f.write_all(&item.max_attempts.map_or(0, |n| n.max(1)).to_le_bytes())?;
        match item.delay {
            Some(d) => {
                f.write_all(&[1])?;
                f.write_all(&d.as_secs().to_le_bytes())?;
                f.write_all(&d.subsec_nanos().to_le_bytes())?;
            }
            None => f.write_all(&[0])?,
        }
        self.items += 1;
        Ok(())
    }

    /// The items, in input order. An error reading the file back ends the
    /// iteration with that error.
    pub fn items(self) -> Result<impl Iterator<Item = Result<NewItem>>> {
        use std::io::Seek;
        let path = self.path;
        let fail = |source| spool_error(&path, source);
        let mut file = self.file.into_inner().map_err(|e| fail(e.into_error()))?;
        file.seek(std::io::SeekFrom::Start(0)).map_err(fail)?;
        let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
        let mut left = self.items;
        Ok(std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let item = read_item(&mut reader).map_err(|source| spool_error(&path, source));
            if item.is_err() {
                left = 0;
            }
            Some(item)
        }))
    }
}

/// A spool file that could not be written or read back. A full disk is
/// said as every other one is, naming the directory.
fn spool_error(path: &Path, source: std::io::Error) -> Error {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    match source.kind() {
        StorageFull | QuotaExceeded => Error::Full {
            path: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        },
        _ => Error::Spool {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// One item as [`Spool::push`] wrote it.
fn read_item(r: &mut impl std::io::Read) -> std::io::Result<NewItem> {
    use std::io::Read;
    fn array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b)?;
        Ok(b)
    }
    fn bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
        let len = u64::from_le_bytes(array(r)?);
        let mut b = Vec::new();
        r.by_ref().take(len).read_to_end(&mut b)?;
        if b.len() as u64 != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(b)
    }
    let payload = bytes(r)?;
    let key = match array::<1>(r)? {
        [0] => None,
        _ => Some(
            String::from_utf8(bytes(r)?)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        ),
    };
    let key_from_payload = array::<1>(r)? != [0];
    let priority = i64::from_le_bytes(array(r)?);
    let max_attempts = match u32::from_le_bytes(array(r)?) {
        0 => None,
        n => Some(n),
    };
    let delay = match array::<1>(r)? {
        [0] => None,
        _ => {
            let secs = u64::from_le_bytes(array(r)?);
            let nanos = u32::from_le_bytes(array(r)?);
            if nanos >= 1_000_000_000 {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            Some(Duration::new(secs, nanos))
        }
    };
    Ok(NewItem {
        payload,
        key,
        key_from_payload,
        priority,
        max_attempts,
        delay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8], format: Format) -> Vec<Result<NewItem>> {
        Records::new(input, "in", format, Defaults::default()).collect()
    }

    #[test]
    fn lines_skip_empty_and_strip_crlf() {
        let items: Vec<_> = parse(b"a\r\n\nb c\n", Format::Lines)
            .into_iter()
            .map(|r| r.map(|i| i.payload))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(items, vec![b"a".to_vec(), b"b c".to_vec()]);
    }

    #[test]
    fn bad_utf8_names_its_line_and_stops() {
        let got = parse(b"ok\n\xff\nlater\n", Format::Lines);
        assert_eq!(got.len(), 2);
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(err.starts_with("in: line 2: not valid UTF-8"), "{err}");
    }

    #[test]
    fn jsonl_fields_and_errors() {
        let line =
            br#"{"payload_base64":"AAEC","key":"k","priority":5,"max_attempts":2,"delay":"1s"}"#;
        let item = parse(line, Format::Jsonl).remove(0).unwrap();
        assert_eq!(item.payload, vec![0, 1, 2]);
        assert_eq!(item.key.as_deref(), Some("k"));
        assert_eq!((item.priority, item.max_attempts), (5, Some(2)));
        assert_eq!(item.delay, Some(Duration::from_secs(1)));

        for (bad, want) in [
            (&br#"{"key":"k"}"#[..], "missing \"payload\""),
            (br#"{"payload":"a","colour":1}"#, "unknown field \"colour\""),
            (br#"{"payload":"a""#, "invalid JSON"),
            (br#"[1]"#, "expected a JSON object"),
            (
                br#"{"payload":"a","delay":-1}"#,
                "\"delay\" must be seconds",
            ),
            (
                br#"{"payload":"a","delay":1e20}"#,
                "\"delay\" must be seconds",
            ),
        ] {
            let err = parse(bad, Format::Jsonl).remove(0).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }

    #[test]
    fn a_spool_gives_back_every_field_of_every_item() {
        let dir = tempfile::tempdir().unwrap();
        let mut full = NewItem::new(b"\0\xff bytes\n".to_vec()).key("k\u{e9}");
        full.priority = -7;
        full.max_attempts = Some(9);
        full.delay = Some(Duration::new(12, 345_678_901));
        let mut by_payload = NewItem::new("plain");
        by_payload.key_from_payload = true;
        let items = vec![full, by_payload, NewItem::new(Vec::new())];
        let spool = Spool::fill(dir.path(), items.clone().into_iter().map(Ok)).unwrap();
        assert_eq!(spool.len(), 3);
        // Unlinked as soon as made: nothing in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let back: Vec<NewItem> = spool.items().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(back, items);
    }

    #[test]
    fn a_spool_stops_at_the_first_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let got = parse(
            b"{\"payload\":\"a\"}\n{\"payload\":1,\"delay\":-1}\n",
            Format::Jsonl,
        );
        let err = Spool::fill(dir.path(), got).err().unwrap().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn nul_keeps_every_byte() {
        let got: Vec<_> = parse(b"a\nb\xff\0c\0", Format::Nul)
            .into_iter()
            .map(|r| r.unwrap().payload)
            .collect();
        assert_eq!(got, vec![b"a\nb\xff".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn overlong_record_is_refused() {
        let defaults = Defaults {
            max_record: 10,
            ..Defaults::default()
        };
        let input = [b'x'; 100];
        let got: Vec<_> = Records::new(&input[..], "in", Format::Lines, defaults).collect();
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("longer than the 10-byte limit"), "{err}");
    }
}
