//! W3C trace context (`traceparent`, `tracestate`), from the request to the queue.
//!
//! A valid `traceparent` on the incoming request makes the relay's receive span a child of the
//! caller's span, in the same trace; without one (or with an invalid one, which the
//! specification says to ignore, `tracestate` with it) the relay starts a trace. The context is
//! stored with the event, so a publish after a restart still belongs to the trace. The message
//! is published with a `traceparent` naming the relay's publish span, so a consumer's span
//! becomes its child.
//!
//! A leaf: it knows no stage. Spans are exported (when configured) by [`crate::telemetry`].

use serde::{Deserialize, Serialize};

/// The trace an event belongs to, and the relay's receive span in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// 32 lowercase hex digits, never all zero.
    pub trace_id: String,
    /// The relay's receive span: 16 lowercase hex digits, never all zero.
    pub span_id: String,
    /// The caller's span the receive span is a child of, when the request carried one.
    pub parent_span_id: Option<String>,
    /// The trace flags (bit 0: sampled), as the caller sent them; `01` for a trace we start.
    pub flags: u8,
    /// The caller's `tracestate`, passed on as it came.
    pub tracestate: Option<String>,
}

/// Longest `tracestate` passed on: the specification's limit for what a vendor must keep.
const MAX_TRACESTATE: usize = 512;
const SAMPLED: u8 = 1;

impl TraceContext {
    /// The context of a request with these headers: a child of the caller's span when its
    /// `traceparent` is valid, else a new trace.
    pub fn of_request(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                span_id: new_span_id(),
                parent_span_id: Some(parent),
                flags,
                tracestate: tracestate.and_then(valid_tracestate),
            },
            None => Self {
                trace_id: new_trace_id(),
                span_id: new_span_id(),
                parent_span_id: None,
                flags: SAMPLED,
                tracestate: None,
            },
        }
    }

    /// A span of this trace that is a child of this one (the publish span).
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: new_span_id(),
            parent_span_id: Some(self.span_id.clone()),
            flags: self.flags,
            tracestate: self.tracestate.clone(),
        }
    }

    /// The `traceparent` header naming this span.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// `(trace id, parent span id, flags)` of a valid `traceparent`, else `None`.
fn parse_traceparent(header: &str) -> Option<(String, String, u8)> {
    let header = header.trim();
    let mut fields = header.split('-');
    let version = fields.next()?;
    let trace_id = fields.next()?;
    let parent = fields.next()?;
    let flags = fields.next()?;
    let rest = fields.next();
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    // Version 00 has exactly four fields; a later version may add fields after them.
    let version_ok =
        lower_hex(version, 2) && version != "ff" && (version != "00" || rest.is_none());
    let valid = version_ok
        && lower_hex(trace_id, 32)
        && nonzero(trace_id)
        && lower_hex(parent, 16)
        && nonzero(parent)
        && lower_hex(flags, 2);
    if !valid {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id.to_string(), parent.to_string(), flags))
}

/// A `tracestate` worth passing on: printable ASCII within the size a vendor must keep.
fn valid_tracestate(header: &str) -> Option<String> {
    let header = header.trim();
    let printable = header.bytes().all(|b| (0x20..0x7f).contains(&b));
    (!header.is_empty() && header.len() <= MAX_TRACESTATE && printable).then(|| header.into())
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0; bytes];
    loop {
        fastrand::fill(&mut raw);
        // All zero is the one invalid value.
        if raw.iter().any(|&b| b != 0) {
            // Not `write!` per byte: formatting took ≈ 3 % of the relay's CPU (perf).
            return crate::signature::lower_hex(&raw);
        }
    }
}

fn new_trace_id() -> String {
    random_hex(16)
}

fn new_span_id() -> String {
    random_hex(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued() {
        let ctx = TraceContext::of_request(Some(VALID), Some("congo=t61rcWkgMzE"));
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(ctx.span_id, "00f067aa0ba902b7");
        assert_eq!(ctx.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_eq!(child.parent_span_id.as_deref(), Some(ctx.span_id.as_str()));
        assert!(parse_traceparent(&child.traceparent()).is_some());
        // A later version may carry more fields.
        assert!(parse_traceparent(&format!("01{}-extra", &VALID[2..])).is_some());
    }

    #[test]
    fn an_invalid_traceparent_starts_a_new_trace_and_drops_tracestate() {
        for bad in [
            "",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            let ctx = TraceContext::of_request(Some(bad), Some("a=b"));
            assert_ne!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert_eq!(ctx.parent_span_id, None, "{bad}");
            assert_eq!(ctx.tracestate, None, "{bad}");
            assert!(parse_traceparent(&ctx.traceparent()).is_some(), "{bad}");
        }
    }

    #[test]
    fn a_generated_traceparent_is_valid_and_sampled() {
        let ctx = TraceContext::of_request(None, None);
        let header = ctx.traceparent();
        assert_eq!(header.len(), 55);
        let (trace, span, flags) = parse_traceparent(&header).unwrap();
        assert_eq!(
            (trace, span, flags),
            (ctx.trace_id.clone(), ctx.span_id.clone(), 1)
        );
        assert!(ctx.sampled());
    }

    #[test]
    fn an_oversized_or_binary_tracestate_is_not_passed_on() {
        let long = "a=".to_string() + &"b".repeat(600);
        assert_eq!(
            TraceContext::of_request(Some(VALID), Some(&long)).tracestate,
            None
        );
        assert_eq!(
            TraceContext::of_request(Some(VALID), Some("a=\u{7}")).tracestate,
            None
        );
    }
}
