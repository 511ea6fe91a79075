//! "2xx means durable", checked on the syscalls of the real binary rather than on its own
//! account of them: the relay runs under strace, and
//!
//! - an audit of the trace fails if a 2xx left the process while a write, or a directory entry,
//!   under the body log (`<data_dir>/bodies/`, the store's write-ahead log) was not yet
//!   covered by a completed sync. sled's own files are an index that an open rebuilds from the
//!   body log, synced lazily on purpose: the store's replay test and the power-loss campaign
//!   prove that part;
//! - an injected EIO on the store's syncs must turn answers into 503 (readiness too) until the
//!   syncs work again, and nothing answered 2xx may be missing after a restart.
//!
//! strace is required, never skipped: `scripts/test.sh` installs it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kallina_relay::signature::sign;
use serde_json::Value;

use crate::helpers::*;

const ADMIN_TOKEN: &str = "durability-admin-token-0123456789";
/// The relay's default max body; the largest event stays just under it.
const MAX_BODY: usize = 1024 * 1024;

/// Every syscall the audit reads. Names missing on an architecture would make strace refuse to
/// start, which fails the test loudly rather than auditing less.
const AUDITED: &str = "write,pwrite64,writev,pwritev,pwritev2,ftruncate,fallocate,truncate,\
copy_file_range,sendfile,open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,\
symlink,symlinkat,unlink,unlinkat,rmdir,fsync,fdatasync,syncfs,sync,sync_file_range,sendto,\
sendmsg,sendmmsg";

// ---------------------------------------------------------------------------------------------
// The audit of a strace log
// ---------------------------------------------------------------------------------------------

/// A write under the data directory: `done` is the line it completed on (None while in flight).
#[derive(Debug, Clone)]
struct Write {
    path: String,
    start: usize,
    done: Option<usize>,
}

/// A directory entry created, renamed, linked or removed in `dir`, complete at line `done`.
#[derive(Debug, Clone)]
struct Entry {
    dir: String,
    done: usize,
}

#[derive(Debug, Clone)]
enum Target {
    File(String),
    Everything,
}

/// A syscall seen at its start, waiting for its completion (same pid, `<... resumed>`).
#[derive(Debug)]
struct Call {
    name: String,
    args: String,
    start: usize,
    write: Option<usize>,
    sync: Option<Target>,
}

#[derive(Debug)]
pub struct Violation {
    pub line: usize,
    pub response: String,
    pub dirty: Vec<String>,
}

/// Replays a `strace -f -yy` log in order and records every 2xx sent on the public port while
/// something under the data directory was not durable.
pub struct Audit {
    data_dir: String,
    cwd: String,
    public_port: u16,
    dirty: Vec<Write>,
    pending: Vec<Entry>,
    in_flight: HashMap<u32, Call>,
    pub responses_2xx: usize,
    pub files_written: BTreeSet<String>,
    pub violations: Vec<Violation>,
}

impl Audit {
    pub fn new(data_dir: &str, cwd: &str, public_port: u16) -> Self {
        Self {
            data_dir: data_dir.trim_end_matches('/').to_string(),
            cwd: cwd.to_string(),
            public_port,
            dirty: Vec::new(),
            pending: Vec::new(),
            in_flight: HashMap::new(),
            responses_2xx: 0,
            files_written: BTreeSet::new(),
            violations: Vec::new(),
        }
    }

    pub fn run(data_dir: &str, cwd: &str, public_port: u16, log: &str) -> Self {
        let mut audit = Self::new(data_dir, cwd, public_port);
        for (i, line) in log.lines().enumerate() {
            audit.line(i + 1, line);
        }
        audit
    }

    fn under_data_dir(&self, path: &str) -> bool {
        path == self.data_dir
            || path
                .strip_prefix(&self.data_dir)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// One line of the log; `number` orders events (a sync covers what completed before the
    /// line it started on).
    pub fn line(&mut self, number: usize, line: &str) {
        let (pid, rest) = match line.split_once(' ') {
            Some((pid, rest)) if pid.bytes().all(|b| b.is_ascii_digit()) && !pid.is_empty() => {
                (pid.parse::<u32>().unwrap_or(0), rest.trim_start())
            }
            _ => (0, line),
        };
        if let Some(resumed) = rest.strip_prefix("<... ") {
            // `<... NAME resumed>REST) = RET`
            let Some((_, tail)) = resumed.split_once(" resumed>") else {
                return;
            };
            if let Some(call) = self.in_flight.remove(&pid) {
                let ret = return_value(tail);
                let mut args = call.args.clone();
                args.push_str(tail);
                self.complete(number, Call { args, ..call }, ret.as_deref());
            }
            return;
        }
        let Some(open) = rest.find('(') else {
            return; // `+++ exited`, `--- SIGTERM`, and anything else without a call
        };
        let name = &rest[..open];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return;
        }
        let body = &rest[open + 1..];
        let unfinished = body.strip_suffix(" <unfinished ...>");
        let args = unfinished.unwrap_or(body).to_string();
        let mut call = Call {
            name: name.to_string(),
            args,
            start: number,
            write: None,
            sync: None,
        };
        self.start(number, &mut call);
        if unfinished.is_some() {
            self.in_flight.insert(pid, call);
        } else {
            let ret = return_value(body);
            self.complete(number, call, ret.as_deref());
        }
    }

    fn start(&mut self, number: usize, call: &mut Call) {
        let args = split_args(&call.args);
        let fd_path = |i: usize| args.get(i).and_then(|a| fd_annotation(a));
        let written = match call.name.as_str() {
            "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" | "ftruncate"
            | "fallocate" | "sendfile" => fd_path(0),
            "copy_file_range" => fd_path(2),
            "truncate" => args
                .first()
                .and_then(|a| c_string(a))
                .map(|p| self.resolve(None, &p)),
            _ => None,
        };
        if let Some(path) = written {
            if self.under_data_dir(&path) {
                self.files_written.insert(path.clone());
                self.dirty.push(Write {
                    path,
                    start: number,
                    done: None,
                });
                call.write = Some(self.dirty.len() - 1);
            } else if matches!(
                call.name.as_str(),
                "write" | "writev" | "sendto" | "sendmsg" | "sendmmsg"
            ) {
                self.response(number, &path, &call.args);
            }
        } else if matches!(call.name.as_str(), "sendto" | "sendmsg" | "sendmmsg") {
            if let Some(path) = fd_path(0) {
                self.response(number, &path, &call.args);
            }
        }
        call.sync = match call.name.as_str() {
            // Any file's or directory's: the audited root's own entry lives in its parent.
            "fsync" | "fdatasync" => fd_path(0).map(Target::File),
            // syncfs flushes the whole filesystem of its fd; only an fd inside the data
            // directory is sure to be on the data directory's filesystem.
            "syncfs" => fd_path(0)
                .filter(|p| self.under_data_dir(p))
                .map(|_| Target::Everything),
            "sync" => Some(Target::Everything),
            _ => None,
        };
    }

    /// A socket send of a 2xx status line on the public listener.
    fn response(&mut self, number: usize, fd: &str, args: &str) {
        let is_socket = fd.starts_with("TCP") || fd.starts_with("socket:");
        let public = format!(":{}->", self.public_port);
        if !is_socket || !fd.contains(&public) {
            return;
        }
        let Some(quote) = args.find('"') else {
            return;
        };
        let data = &args[quote + 1..];
        if !data.starts_with("HTTP/1.1 2") {
            return;
        }
        self.responses_2xx += 1;
        let response = data.split("\\r\\n").next().unwrap_or(data).to_string();
        let dirty = self.dirty_now();
        if !dirty.is_empty() {
            self.violations.push(Violation {
                line: number,
                response,
                dirty,
            });
        }
    }

    /// What is not durable at this point, one line per file or directory, with the log lines
    /// of the writes or entry changes that make it so.
    fn dirty_now(&self) -> Vec<String> {
        let mut files: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for w in &self.dirty {
            files.entry(&w.path).or_default().push(w.start);
        }
        let mut dirs: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for e in &self.pending {
            dirs.entry(&e.dir).or_default().push(e.done);
        }
        let lines = |v: &[usize]| {
            let shown: Vec<String> = v.iter().take(5).map(|n| n.to_string()).collect();
            let more = if v.len() > 5 {
                format!(" and {} more", v.len() - 5)
            } else {
                String::new()
            };
            format!("{}{more}", shown.join(", "))
        };
        files
            .iter()
            .map(|(p, v)| format!("file {p}: unsynced writes at lines {}", lines(v)))
            .chain(dirs.iter().map(|(d, v)| {
                format!(
                    "directory {d}: unsynced entry changes at lines {}",
                    lines(v)
                )
            }))
            .collect()
    }

    fn complete(&mut self, number: usize, call: Call, ret: Option<&str>) {
        if let Some(i) = call.write {
            if let Some(w) = self.dirty.get_mut(i) {
                w.done = Some(number);
            }
        }
        let ok = ret.is_some_and(|r| !r.starts_with('-') && !r.starts_with('?'));
        if let Some(target) = &call.sync {
            if ok {
                self.clean(target, call.start);
            }
            return;
        }
        if !ok {
            return;
        }
        let args = split_args(&call.args);
        let string = |i: usize| args.get(i).and_then(|a| c_string(a));
        let dirfd = |i: usize| args.get(i).and_then(|a| fd_annotation(a));
        let mut changed: Vec<String> = Vec::new();
        match call.name.as_str() {
            "open" | "openat" => {
                let flags = if call.name == "open" { 1 } else { 2 };
                let flags = args.get(flags).map(String::as_str).unwrap_or("");
                // The return value names the file opened; O_CREAT may have created it, and
                // O_TRUNC changed its size (a write of sorts).
                if let Some(path) = ret.and_then(fd_annotation) {
                    if flags.contains("O_CREAT") || flags.contains("O_TMPFILE") {
                        changed.push(path.clone());
                    }
                    if flags.contains("O_TRUNC") && self.under_data_dir(&path) {
                        self.files_written.insert(path.clone());
                        self.dirty.push(Write {
                            path,
                            start: call.start,
                            done: Some(number),
                        });
                    }
                }
            }
            "creat" | "mkdir" | "unlink" | "rmdir" => {
                changed.extend(string(0).map(|p| self.resolve(None, &p)))
            }
            "mkdirat" | "unlinkat" => {
                changed.extend(string(1).map(|p| self.resolve(dirfd(0).as_deref(), &p)))
            }
            "rename" | "link" => {
                changed.extend(string(0).map(|p| self.resolve(None, &p)));
                changed.extend(string(1).map(|p| self.resolve(None, &p)));
            }
            "symlink" => changed.extend(string(1).map(|p| self.resolve(None, &p))),
            "symlinkat" => changed.extend(string(2).map(|p| self.resolve(dirfd(1).as_deref(), &p))),
            "renameat" | "renameat2" | "linkat" => {
                changed.extend(string(1).map(|p| self.resolve(dirfd(0).as_deref(), &p)));
                changed.extend(string(3).map(|p| self.resolve(dirfd(2).as_deref(), &p)));
            }
            _ => {}
        }
        for path in changed {
            if self.under_data_dir(&path) {
                let dir = Path::new(&path)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                self.pending.push(Entry { dir, done: number });
            }
        }
    }

    /// A sync that started on line `started` covers what had completed before it started.
    fn clean(&mut self, target: &Target, started: usize) {
        let covered = |done: Option<usize>| done.is_some_and(|d| d < started);
        match target {
            Target::Everything => {
                self.retain_dirty(|w| !covered(w.done));
                self.pending.retain(|e| !covered(Some(e.done)));
            }
            Target::File(path) => {
                self.retain_dirty(|w| !(w.path == *path && covered(w.done)));
                self.pending
                    .retain(|e| !(e.dir == *path && covered(Some(e.done))));
            }
        }
    }

    /// Drops covered writes, keeping the indexes that calls still in flight hold valid.
    fn retain_dirty(&mut self, keep: impl Fn(&Write) -> bool) {
        let mut remap = vec![None; self.dirty.len()];
        let mut kept = Vec::with_capacity(self.dirty.len());
        for (i, w) in self.dirty.drain(..).enumerate() {
            if w.done.is_none() || keep(&w) {
                remap[i] = Some(kept.len());
                kept.push(w);
            }
        }
        self.dirty = kept;
        for call in self.in_flight.values_mut() {
            call.write = call.write.and_then(|i| remap.get(i).copied().flatten());
        }
    }

    fn resolve(&self, dir: Option<&str>, path: &str) -> String {
        if path.starts_with('/') {
            path.to_string()
        } else {
            Path::new(dir.unwrap_or(&self.cwd))
                .join(path)
                .display()
                .to_string()
        }
    }
}

/// `...)   = RET` → `RET`: the last ` = ` after a `)` (strace pads before it to align; strings
/// are escaped and the return part has none).
fn return_value(tail: &str) -> Option<String> {
    let i = tail.rfind(" = ")?;
    tail[..i]
        .trim_end()
        .ends_with(')')
        .then(|| tail[i + 3..].trim().to_string())
}

/// Splits the arguments at top-level commas (outside strings, brackets and braces); a closing
/// parenthesis of the call ends them.
fn split_args(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let (mut depth, mut in_string, mut escaped) = (0i32, false, false);
    for c in args.chars() {
        if in_string {
            current.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' | '<' => depth += 1,
            ']' | '}' | '>' => depth -= 1,
            ')' if depth == 0 => {
                out.push(current.trim().to_string());
                return out;
            }
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// `9</tmp/x/data/db>` → `/tmp/x/data/db`; `30<TCP:[1.2.3.4:80->5.6.7.8:9]>` → `TCP:[...]`.
fn fd_annotation(arg: &str) -> Option<String> {
    let open = arg.find('<')?;
    let fd = &arg[..open];
    if !(fd == "AT_FDCWD" || (!fd.is_empty() && fd.bytes().all(|b| b.is_ascii_digit()))) {
        return None;
    }
    let close = arg.rfind('>')?;
    (close > open).then(|| arg[open + 1..close].to_string())
}

/// A strace string argument, unescaped.
fn c_string(arg: &str) -> Option<String> {
    let inner = arg.strip_prefix('"')?;
    let mut out = Vec::new();
    let mut chars = inner.bytes().peekable();
    while let Some(b) = chars.next() {
        match b {
            b'"' => return String::from_utf8(out).ok(),
            b'\\' => match chars.next()? {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'x' => {
                    let hex: String = [chars.next()?, chars.next()?]
                        .iter()
                        .map(|&b| b as char)
                        .collect();
                    out.push(u8::from_str_radix(&hex, 16).ok()?);
                }
                d @ b'0'..=b'7' => {
                    let mut value = (d - b'0') as u32;
                    for _ in 0..2 {
                        match chars.peek() {
                            Some(&n @ b'0'..=b'7') => {
                                value = value * 8 + (n - b'0') as u32;
                                chars.next();
                            }
                            _ => break,
                        }
                    }
                    out.push(value as u8);
                }
                other => out.push(other),
            },
            other => out.push(other),
        }
    }
    None
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    const D: &str = "/t/data";

    fn audit(log: &str) -> Audit {
        Audit::run(D, "/t", 8080, log)
    }

    const ANSWER: &str = r#"sendto(30<TCP:[127.0.0.1:8080->127.0.0.1:5000]>, "HTTP/1.1 202 Accepted\r\ncontent-length: 93\r\n"..., 251, MSG_NOSIGNAL, NULL, 0) = 251"#;

    #[test]
    fn the_known_bad_pattern_is_flagged_a_blob_and_new_entries_never_synced() {
        let log = format!(
            "10 mkdir(\"/t/data/blobs\", 0777) = 0\n\
             10 openat(AT_FDCWD</t>, \"/t/data/db\", O_RDWR|O_CREAT|O_CLOEXEC, 0666) = 9</t/data/db>\n\
             12 openat(AT_FDCWD</t>, \"/t/data/blobs/4242\", O_WRONLY|O_CREAT|O_CLOEXEC, 0666) = 12</t/data/blobs/4242>\n\
             12 write(12</t/data/blobs/4242>, \"\\1\\2\"..., 200000) = 200000\n\
             12 pwrite64(9</t/data/db>, \"\\377\\272\"..., 628, 0) = 628\n\
             12 sync_file_range(9</t/data/db>, 0, 628, SYNC_FILE_RANGE_WRITE) = 0\n\
             11 fdatasync(11</t/data/db>)    = 0\n\
             15 {ANSWER}\n"
        );
        let a = audit(&log);
        assert_eq!(a.responses_2xx, 1);
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        let v = &a.violations[0];
        assert_eq!(v.line, 8);
        assert_eq!(v.response, "HTTP/1.1 202 Accepted");
        let dirty = v.dirty.join("\n");
        assert!(
            dirty.contains("file /t/data/blobs/4242: unsynced writes at lines 4"),
            "{dirty}"
        );
        assert!(
            dirty.contains("directory /t/data: unsynced entry changes at lines 1, 2"),
            "{dirty}"
        );
        assert!(
            dirty.contains("directory /t/data/blobs: unsynced entry changes at lines 3"),
            "{dirty}"
        );
        assert!(!dirty.contains("/t/data/db:"), "{dirty}");
    }

    #[test]
    fn syncfs_after_the_writes_makes_the_answer_clean_and_sync_file_range_does_not() {
        let before = "12 openat(AT_FDCWD</t>, \"blobs/7\", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 12</t/data/blobs/7>\n\
                      12 writev(12</t/data/blobs/7>, [{iov_base=\"ab\", iov_len=2}], 1) = 2\n\
                      12 sync_file_range(12</t/data/blobs/7>, 0, 2, SYNC_FILE_RANGE_WRITE) = 0\n";
        let a = audit(&format!("{before}15 {ANSWER}\n"));
        assert_eq!(a.violations.len(), 1);
        // strace pads before ` = ` to align the return values.
        let a = audit(&format!(
            "{before}11  syncfs(5</t/data>)     = 0\n15 {ANSWER}\n"
        ));
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        // On a descriptor outside the data directory it proves nothing about its filesystem.
        let a = audit(&format!(
            "{before}11 syncfs(5</elsewhere>) = 0\n15 {ANSWER}\n"
        ));
        assert_eq!(a.violations.len(), 1);
    }

    #[test]
    fn a_sync_covers_only_writes_complete_when_it_started() {
        // The write completes after the fsync started: not covered.
        let log = format!(
            "12 pwrite64(9</t/data/db>, \"x\", 1, 0 <unfinished ...>\n\
             11 fsync(9</t/data/db> <unfinished ...>\n\
             12 <... pwrite64 resumed>) = 1\n\
             11 <... fsync resumed>)          = 0\n\
             15 {ANSWER}\n"
        );
        let a = audit(&log);
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        assert!(a.violations[0].dirty[0].contains("/t/data/db: unsynced writes at lines 1"));
        // The write completes before the fsync starts; the answer waits for the resumption.
        let log = format!(
            "12 pwrite64(9</t/data/db>, \"x\", 1, 0) = 1\n\
             11 fdatasync(9</t/data/db> <unfinished ...>\n\
             15 {ANSWER}\n\
             11 <... fdatasync resumed>) = 0\n\
             15 {ANSWER}\n"
        );
        let a = audit(&log);
        assert_eq!(a.responses_2xx, 2);
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        assert_eq!(
            a.violations[0].line, 3,
            "answered while the sync was still running"
        );
        // An fsync of one file does not cover another, and a failed one covers nothing.
        let log = format!(
            "12 write(9</t/data/db>, \"x\", 1) = 1\n\
             12 write(10</t/data/conf>, \"y\", 1) = 1\n\
             11 fsync(9</t/data/db>) = 0\n\
             11 fsync(10</t/data/conf>) = -1 EIO (Input/output error) (INJECTED)\n\
             15 {ANSWER}\n"
        );
        let a = audit(&log);
        let dirty = a.violations[0].dirty.join("\n");
        assert!(
            dirty.contains("/t/data/conf") && !dirty.contains("/t/data/db"),
            "{dirty}"
        );
    }

    #[test]
    fn a_directory_fsync_after_the_entry_changes_covers_them() {
        let log = format!(
            "10 renameat2(AT_FDCWD</t>, \"/t/data/conf.tmp\", AT_FDCWD</t>, \"/t/data/conf\", RENAME_NOREPLACE) = 0\n\
             10 unlinkat(7</t/data/blobs>, \"12\", 0) = 0\n\
             10 fsync(7</t/data/blobs>) = 0\n\
             15 {ANSWER}\n\
             10 fsync(8</t/data>) = 0\n\
             15 {ANSWER}\n"
        );
        let a = audit(&log);
        assert_eq!(a.responses_2xx, 2);
        assert_eq!(a.violations.len(), 1, "{:?}", a.violations);
        assert_eq!(
            a.violations[0].dirty,
            vec!["directory /t/data: unsynced entry changes at lines 1, 1".to_string()]
        );
    }

    #[test]
    fn only_2xx_on_the_public_port_are_checked() {
        let log = "12 write(9</t/data/db>, \"x\", 1) = 1\n\
            15 write(31<TCP:[127.0.0.1:9090->127.0.0.1:5001]>, \"HTTP/1.1 200 OK\\r\\n\"..., 100) = 100\n\
            15 sendto(30<TCP:[127.0.0.1:8080->127.0.0.1:5000]>, \"HTTP/1.1 503 Service Unavailable\\r\\n\"..., 100, MSG_NOSIGNAL, NULL, 0) = 100\n\
            15 writev(30<TCP:[127.0.0.1:8080->127.0.0.1:5000]>, [{iov_base=\"HTTP/1.1 200 OK\\r\\n\", iov_len=17}], 1) = 17\n\
            15 +++ exited with 0 +++\n";
        let a = audit(log);
        assert_eq!(a.responses_2xx, 1);
        assert_eq!(a.violations.len(), 1);
        assert_eq!(a.violations[0].response, "HTTP/1.1 200 OK");
        assert_eq!(a.violations[0].line, 4);
    }

    #[test]
    fn strings_and_arguments_parse() {
        assert_eq!(
            split_args(r#"9</a, b>, "x, \"y)", [{iov_base="z", iov_len=1}], 1) = 1"#),
            vec![
                "9</a, b>",
                r#""x, \"y)""#,
                r#"[{iov_base="z", iov_len=1}]"#,
                "1"
            ]
        );
        assert_eq!(c_string(r#""a\\b\"c\n\x41\101""#).unwrap(), "a\\b\"c\nAA");
        assert_eq!(fd_annotation("9</t/data/db>").unwrap(), "/t/data/db");
        assert_eq!(fd_annotation("AT_FDCWD</t>").unwrap(), "/t");
        assert_eq!(
            fd_annotation("12</t/data/blobs/7>").unwrap(),
            "/t/data/blobs/7"
        );
        assert_eq!(fd_annotation("\"x<y>\""), None);
        assert_eq!(
            return_value(r#"(3, "a) = b", 1) = -1 EIO (Input/output error) (INJECTED)"#).unwrap(),
            "-1 EIO (Input/output error) (INJECTED)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The relay under strace
// ---------------------------------------------------------------------------------------------

/// Fails, saying how to get it, when strace cannot run: these tests must never pass unrun.
fn require_strace() {
    let ok = Command::new("strace")
        .args(["-qq", "-e", "trace=none", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "strace is missing or cannot trace here (the durability tests need it): run the suite \
         with `scripts/test.sh`, which installs it, or `apt-get install strace`; in a container \
         it also needs the ptrace capability (e.g. `docker run --cap-add SYS_PTRACE`)"
    );
}

/// The relay binary, under strace or not; killed (with its tracer) on drop.
struct Relay {
    process: Child,
    /// The relay's own pid (under strace, the tracer's child).
    pid: i32,
    address: String,
    admin_address: String,
    port: u16,
    stderr_file: PathBuf,
}

fn relay_command(program: &str, data_dir: &Path, port: u16, admin_port: u16) -> Command {
    let mut command = Command::new(program);
    child_relay_env(&mut command, data_dir, port, admin_port)
        .env("KALLINA_RELAY_AMQP_URL", NO_BROKER_URL)
        .env("KALLINA_RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        // No sweep during a test: its writes would only blur which sync belongs to what.
        .env("KALLINA_RELAY_SWEEP_INTERVAL", "1h")
        .env("KALLINA_RELAY_SHUTDOWN_GRACE", "5s")
        .env("RUST_LOG", "warn");
    command
}

impl Relay {
    /// `strace_args` empty: the binary itself. Otherwise strace with those options before it.
    async fn start(dir: &Path, strace_args: &[String]) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        // Another build can be audited in place of this one (an older commit, a build that
        // skips its syncs) to see the test catch it.
        let binary = std::env::var("KALLINA_TEST_RELAY_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kallina-relay").to_string());
        let data_dir = dir.join("data");
        let mut command = if strace_args.is_empty() {
            relay_command(&binary, &data_dir, port, admin_port)
        } else {
            let mut c = relay_command("strace", &data_dir, port, admin_port);
            c.args(strace_args).arg("--").arg(&binary);
            c
        };
        let stderr_file = dir.join(format!("relay-{port}.stderr"));
        command
            .arg("serve")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_file).unwrap());
        let process = command.spawn().expect("the relay (or strace) starts");
        let mut relay = Self {
            pid: process.id() as i32,
            process,
            address: format!("http://127.0.0.1:{port}"),
            admin_address: format!("http://127.0.0.1:{admin_port}"),
            port,
            stderr_file,
        };
        if !strace_args.is_empty() {
            relay.pid = relay.traced_child(&binary).await;
        }
        let client = http_client();
        let healthz = format!("{}/healthz", relay.admin_address);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client
                .get(&healthz)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                break;
            }
            if let Ok(Some(status)) = relay.process.try_wait() {
                panic!(
                    "the relay exited ({status}) before serving:\n{}",
                    relay.stderr_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not serve within 60s:\n{}",
                relay.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay
    }

    /// The pid strace started, from /proc (strace has no option to print it). strace forks
    /// short-lived children of its own at start to probe ptrace, so the relay is the child that
    /// runs `binary`.
    async fn traced_child(&mut self, binary: &str) -> i32 {
        let binary = std::fs::canonicalize(binary).unwrap();
        let path = format!("/proc/{0}/task/{0}/children", self.process.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let children = std::fs::read_to_string(&path).unwrap_or_default();
            let relay = children.split_whitespace().find(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == binary)
            });
            if let Some(pid) = relay {
                return pid.parse().unwrap();
            }
            if let Ok(Some(status)) = self.process.try_wait() {
                panic!(
                    "strace exited ({status}) before starting the relay:\n{}",
                    self.stderr_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "strace started no relay within 20s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM to the relay, as an operator stops it; strace ends with it.
    async fn stop(mut self, what: &str) {
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{what}: stopped with {status}:\n{}",
                    self.stderr_tail()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not stopped within 30s of SIGTERM; its threads:\n{}\n{}",
                threads(self.pid),
                self.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, client: &reqwest::Client, body: &[u8]) -> reqwest::Response {
        client
            .post(format!("{}/webhooks/kallina", self.address))
            .header("Content-Type", "application/json")
            .header("X-Kallina-Signature", sign(SECRET.as_bytes(), body))
            .body(body.to_vec())
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("the relay answers")
    }
}

/// Name, state and wait channel of each thread of `pid`, to tell a hang from a lost signal.
fn threads(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("pid {pid} is gone");
    };
    tasks
        .flatten()
        .map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit(") ")
                .next()
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("");
            format!(
                "{} {} {state} {}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.process.try_wait().ok().flatten().is_none() {
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// A signed-ready event of about `size` bytes (random padding, so nothing compresses it away).
fn sized_event(marker: usize, size: usize) -> Vec<u8> {
    let head = serde_json::json!({
        "event": "call.ended",
        "timestamp": now_rfc3339(),
        "data": {"call_id": format!("call_{marker}"), "pad": ""},
    })
    .to_string();
    let pad: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(size.saturating_sub(head.len()))
        .collect();
    head.replacen("\"pad\":\"\"", &format!("\"pad\":\"{pad}\""), 1)
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_2xx_leaves_the_process_while_a_write_to_the_body_log_is_unsynced() {
    require_strace();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let strace_args: Vec<String> = ["-f", "-qq", "-yy", "-s", "64", "-o"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            log.display().to_string(),
            "-e".into(),
            format!("trace={AUDITED}"),
        ])
        .collect();
    let relay = Relay::start(dir.path(), &strace_args).await;
    let client = http_client();

    let mut sizes = vec![1_000, 2_000, 4_000];
    sizes.extend((0..30).map(|_| fastrand::usize(10_000..=30_000)));
    // Above sled's blob threshold (~128 KiB), where sled wrote items to files of their own
    // under blobs/ when it held the records; they now go to the body log like the others.
    sizes.extend([
        140_000,
        200_000,
        300_000,
        600_000,
        MAX_BODY - 4096,
        5_000,
        131_000,
    ]);
    let mut bodies = Vec::new();
    let mut answered_2xx = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        let body = sized_event(i, size);
        assert!(body.len() <= MAX_BODY);
        let response = relay.post(&client, &body).await;
        assert_eq!(response.status(), 202, "event {i} ({size} bytes)");
        answered_2xx += 1;
        bodies.push(body);
    }
    for i in [0, 31, 36] {
        let response = relay.post(&client, &bodies[i]).await;
        assert_eq!(response.status(), 200, "duplicate of event {i}");
        let json: Value = response.json().await.unwrap();
        assert_eq!(json["status"], "duplicate");
        answered_2xx += 1;
    }
    let port = relay.port;
    relay.stop("the relay under strace").await;

    let text = std::fs::read_to_string(&log).expect("the strace log");
    // What an answer rests on: the body log. sled's files under data/ are its index, which
    // the index thread syncs lazily and an open rebuilds from the log.
    let data_dir = dir.path().join("data").join("bodies").display().to_string();
    let audit = Audit::run(&data_dir, &dir.path().display().to_string(), port, &text);
    // Without this the audit could pass by seeing nothing (a changed -yy format, say).
    assert_eq!(
        audit.responses_2xx, answered_2xx,
        "the audit found {} 2xx answers in the trace, the client got {answered_2xx}",
        audit.responses_2xx
    );
    // Records go to the store's body log, not into sled (whose blob files under blobs/ held
    // large ones before it): without a write there, the audit saw no event's body reach disk.
    assert!(
        audit.files_written.iter().any(|p| p.contains("/bodies/")),
        "no write under bodies/ was seen; the events did not reach the body log: {:?}",
        audit.files_written
    );
    if !audit.violations.is_empty() {
        // Kept for reading: the tempdir goes with the test.
        let kept = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("durability-strace-{}.log", std::process::id()));
        let _ = std::fs::copy(&log, &kept);
        // The first answer, then each one whose set of dirty paths differs from the one shown
        // before it: thousands of near-identical entries would hide the blob files.
        let paths = |v: &Violation| -> Vec<String> {
            v.dirty
                .iter()
                .map(|d| d.split(':').next().unwrap_or("").to_string())
                .collect()
        };
        let mut previous = None;
        let shown: Vec<String> = audit
            .violations
            .iter()
            .filter(|v| previous.replace(paths(v)) != Some(paths(v)))
            .take(6)
            .map(|v| {
                format!(
                    "strace log line {}: `{}` sent while not durable:\n    {}",
                    v.line,
                    v.response,
                    v.dirty.join("\n    ")
                )
            })
            .collect();
        panic!(
            "{} of {answered_2xx} 2xx answers were sent before everything under {data_dir} was \
             synced; {} of them, where the dirty paths change:\n{}\nthe strace log: {}",
            audit.violations.len(),
            shown.len(),
            shown.join("\n"),
            kept.display()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// An injected sync failure
// ---------------------------------------------------------------------------------------------

/// The writer thread's syncs numbered FIRST..=LAST fail with EIO (strace counts invocations per
/// thread and per syscall, and all of the store's per-batch syncs run on its writer thread):
/// the events before are stored, one gets the first failure, and recovery consumes the rest.
const FAIL_FIRST: u32 = 6;
const FAIL_LAST: u32 = 13;

async fn readyz_status(client: &reqwest::Client, admin: &str) -> u16 {
    client
        .get(format!("{admin}/readyz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("readyz answers")
        .status()
        .as_u16()
}

fn assert_unavailable(status: u16, retry_after: Option<String>, json: &Value, what: &str) {
    assert_eq!(status, 503, "{what}: {json}");
    assert!(
        retry_after.is_some_and(|v| v.parse::<u32>().is_ok_and(|s| s > 0)),
        "{what}: a 503 without a Retry-After"
    );
    assert_eq!(json["error"]["code"], "unavailable", "{what}: {json}");
    assert!(json["error"]["message"].is_string(), "{what}: {json}");
    assert!(
        json["error"]["request_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{what}: {json}"
    );
}

async fn answer(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let json = response.json().await.unwrap_or(Value::Null);
    (status, retry_after, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_answers_503_until_the_store_recovers_and_loses_nothing_answered_2xx() {
    require_strace();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let syncs = "fdatasync,syncfs";
    let strace_args: Vec<String> = vec![
        "-f".into(),
        "-qq".into(),
        "-o".into(),
        log.display().to_string(),
        "-e".into(),
        format!("trace={syncs}"),
        "-e".into(),
        format!("inject={syncs}:error=EIO:when={FAIL_FIRST}..{FAIL_LAST}"),
    ];
    let relay = Relay::start(dir.path(), &strace_args).await;
    let client = http_client();
    let mut stored: Vec<Vec<u8>> = Vec::new();

    // New events until one meets the first failing sync.
    let mut failed = None;
    for i in 0..2 * FAIL_LAST as usize {
        let body = sized_event(i, 800);
        let (status, retry_after, json) = answer(relay.post(&client, &body).await).await;
        if status == 503 {
            assert_unavailable(status, retry_after, &json, "the event whose sync failed");
            failed = Some(body);
            break;
        }
        assert_eq!(status, 202, "event {i}: {json}");
        stored.push(body);
    }
    let failed = failed.expect("no event was answered 503 although its sync failed");
    assert!(
        !stored.is_empty(),
        "the first event already failed: the window is off"
    );

    assert_eq!(
        readyz_status(&client, &relay.admin_address).await,
        503,
        "/readyz while the store's sync fails"
    );
    // Its bytes may be in sled, but they never proved durable: no `duplicate`.
    let (status, retry_after, json) = answer(relay.post(&client, &failed).await).await;
    assert_unavailable(
        status,
        retry_after,
        &json,
        "a retry while the store is failed",
    );

    // The store comes back on its own once syncs succeed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while readyz_status(&client, &relay.admin_address).await != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz still 503 30s after the injected failures ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _, json) = answer(relay.post(&client, &failed).await).await;
    assert!(
        status == 202 || status == 200,
        "the retry once the store recovered: {status} {json}"
    );
    stored.push(failed);
    for i in 0..3 {
        let body = sized_event(1000 + i, 800);
        let (status, _, json) = answer(relay.post(&client, &body).await).await;
        assert_eq!(status, 202, "a new event after recovery: {json}");
        stored.push(body);
    }
    relay.stop("the relay under strace").await;
    let trace = std::fs::read_to_string(&log).unwrap();
    assert!(
        trace.contains("(INJECTED)"),
        "strace injected no failure; the test proved nothing:\n{}",
        trace.lines().take(20).collect::<Vec<_>>().join("\n")
    );

    // Without strace: everything answered 2xx is still there.
    let relay = Relay::start(dir.path(), &[]).await;
    for (i, body) in stored.iter().enumerate() {
        let id = sha256_hex(body);
        let response = client
            .get(format!("{}/admin/events/{id}", relay.admin_address))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "event {i} ({id}) after the restart");
        let (status, _, json) = answer(relay.post(&client, body).await).await;
        assert_eq!(
            (status, &json["status"]),
            (200, &Value::from("duplicate")),
            "event {i}"
        );
    }
    relay.stop("the restarted relay").await;
}
