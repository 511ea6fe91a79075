//! Reading payload files: one JSON document per file, JSON lines, a directory of them, or
//! standard input; and rewriting the top-level `timestamp` for `--fresh-timestamp`.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cli::Failure;

/// Every payload of every path, in order, with where it came from.
pub(super) fn load(paths: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let mut payloads = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut input = Vec::new();
            std::io::stdin()
                .read_to_end(&mut input)
                .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
            payloads.extend(split("stdin", input, false));
        } else if path.is_dir() {
            let files = payload_files(path)?;
            if files.is_empty() {
                return Err(Failure::Usage(format!(
                    "{}: no *.json or *.jsonl files in this folder",
                    path.display()
                )));
            }
            for file in files {
                payloads.extend(read_file(&file)?);
            }
        } else {
            payloads.extend(read_file(path)?);
        }
    }
    Ok(payloads)
}

fn payload_files(dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    let unreadable =
        |e: std::io::Error| Failure::Usage(format!("cannot read {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let wanted = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "jsonl")
        );
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    Ok(split(&path.display().to_string(), bytes, jsonl))
}

/// One payload, or one per line for JSON Lines. A whole document is sent with its bytes as
/// they are (trailing newline included); input that is neither JSON nor JSON Lines is sent
/// as it is too, for the receiver to say what is wrong with it: that is a test worth running.
fn split(origin: &str, bytes: Vec<u8>, jsonl: bool) -> Vec<(String, Vec<u8>)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    if !jsonl && serde_json::from_slice::<IgnoredAny>(&bytes).is_ok() {
        return vec![(origin.to_string(), bytes)];
    }
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .collect();
    let is_lines = jsonl
        || (lines.len() > 1
            && lines
                .iter()
                .all(|(_, line)| serde_json::from_slice::<IgnoredAny>(line).is_ok()));
    if !is_lines {
        return vec![(origin.to_string(), bytes)];
    }
    lines
        .into_iter()
        .map(|(i, line)| (format!("{origin}:{}", i + 1), line.to_vec()))
        .collect()
}

#[derive(Deserialize)]
struct TimestampField<'a> {
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
}

/// `body` with the value of its top-level `timestamp` replaced by `now`, every other byte
/// unchanged (key order, spacing, escapes): re-serialising the document would change bytes the
/// platform chose, and the signature is made over what is sent. `None` when the body is not a
/// JSON object with one string `timestamp` (duplicate keys make the parse fail, as they do in
/// the receiver).
pub(super) fn with_timestamp(body: &[u8], now: &str) -> Option<Vec<u8>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let fields: TimestampField = serde_json::from_slice(body).ok()?;
    let raw = fields.timestamp?.get();
    if !raw.starts_with('"') {
        return None;
    }
    // A borrowed RawValue is a slice of the input: its address gives its place in the body.
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start + raw.len();
    if body.get(start..end)? != raw.as_bytes() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + now.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(serde_json::to_string(now).ok()?.as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_timestamp_value_changes() {
        let body = b"{\n  \"event\": \"call.ended\",\n  \"timestamp\":  \"2025-01-23T10:30:00Z\" ,\n  \"data\": {\"timestamp\": \"keep\"}\n}\n";
        let out = with_timestamp(body, "2026-11-29T06:00:00.5Z").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n  \"event\": \"call.ended\",\n  \"timestamp\":  \"2026-11-29T06:00:00.5Z\" ,\n  \"data\": {\"timestamp\": \"keep\"}\n}\n"
        );
    }

    #[test]
    fn no_rewrite_without_one_string_timestamp() {
        for body in [
            &br#"{"event":"x"}"#[..],
            br#"{"event":"x","timestamp":12}"#,
            br#"{"timestamp":"a","timestamp":"b"}"#,
            br#"["timestamp"]"#,
            b"not json",
        ] {
            assert_eq!(with_timestamp(body, "now"), None, "{body:?}");
        }
    }

    #[test]
    fn json_lines_are_detected_and_documents_are_kept_whole() {
        let pretty = b"{\n  \"event\": \"a\"\n}\n".to_vec();
        assert_eq!(
            split("f", pretty.clone(), false),
            vec![("f".into(), pretty)]
        );
        let lines = b"{\"event\":\"a\"}\r\n\n{\"event\":\"b\"}\n".to_vec();
        assert_eq!(
            split("f", lines, false),
            vec![
                ("f:1".into(), b"{\"event\":\"a\"}".to_vec()),
                ("f:3".into(), b"{\"event\":\"b\"}".to_vec()),
            ]
        );
        assert_eq!(
            split("f", b"{\"event\":\"a\"}\n".to_vec(), true),
            vec![("f:1".into(), b"{\"event\":\"a\"}".to_vec())]
        );
        assert_eq!(split("f", b"not json\nat all".to_vec(), false).len(), 1);
        assert!(split("f", b" \n".to_vec(), false).is_empty());
    }
}
