//! The routing key a message is published with, from the `routing_key` template: `{event}`
//! (the default, the contract's behaviour), `{source}`, and string fields of the envelope,
//! top-level (`{call_id}`) or under `data` (`{data.agent_id}`). Consumers bind by pattern:
//! `staging.#`, `call.ended.agent_42`, `*.*.agent_42`.
//!
//! A field comes from the caller's payload, so its value is used only when it is one safe
//! word: 1 to 64 letters, digits, `-` or `_`. Anything else (missing, not a string, empty,
//! too long, or holding a `.`, `*`, `#` or any other character) becomes `_`, so a payload can
//! neither add words to the key nor inject a wildcard. `{event}` is the event type as
//! received, dots included (today's keys); `{source}` is a configured name, safe by
//! construction. The key is rendered when the event is published, from the stored record.

use serde_json::Value;

use crate::store::OutboxRecord;

/// What a missing or unsafe field value becomes.
pub const PLACEHOLDER: &str = "_";
/// Longest field value used as it is.
const MAX_WORD: usize = 64;
/// AMQP's limit for a routing key (a short string).
const MAX_KEY: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Event,
    Source,
    /// A top-level field, or a field of `data` (`inside_data`).
    Field {
        name: String,
        inside_data: bool,
    },
}

/// A parsed `routing_key` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingKey {
    parts: Vec<Part>,
}

impl Default for RoutingKey {
    fn default() -> Self {
        Self {
            parts: vec![Part::Event],
        }
    }
}

impl RoutingKey {
    /// Parses a template; the error says what is wrong, for the setting's error line.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| format!("an unclosed `{{` in {template:?}"))?;
                    parts.push(placeholder(&rest[1..end])?);
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let literal = &rest[..end];
                    if !literal.bytes().all(|b| safe_byte(b) || b == b'.') {
                        return Err(format!(
                            "literal text {literal:?}: only letters, digits, `.`, `-` and `_` \
                             (and `{{placeholders}}`)"
                        ));
                    }
                    parts.push(Part::Literal(literal.to_string()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err("an empty template".into());
        }
        Ok(Self { parts })
    }

    /// True if rendering reads the body (a field placeholder).
    fn reads_body(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field { .. }))
    }

    /// The routing key of `record`.
    pub fn render(&self, record: &OutboxRecord) -> String {
        // Only a template with fields parses the body, once; the body was checked to be a JSON
        // object when it was accepted.
        let envelope: Option<Value> = if self.reads_body() {
            serde_json::from_slice(&record.body).ok()
        } else {
            None
        };
        let mut key = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => key.push_str(text),
                Part::Event => key.push_str(&record.event),
                Part::Source => key.push_str(&record.source),
                Part::Field { name, inside_data } => {
                    let object = match (&envelope, inside_data) {
                        (Some(envelope), false) => Some(envelope),
                        (Some(envelope), true) => envelope.get("data"),
                        (None, _) => None,
                    };
                    let value = object.and_then(|o| o.get(name)).and_then(Value::as_str);
                    key.push_str(value.filter(|v| is_safe_word(v)).unwrap_or(PLACEHOLDER));
                }
            }
        }
        truncate(key)
    }
}

fn placeholder(inside: &str) -> Result<Part, String> {
    let (name, inside_data) = match inside.strip_prefix("data.") {
        Some(name) => (name, true),
        None => (inside, false),
    };
    match (name, inside_data) {
        ("event", false) => Ok(Part::Event),
        ("source", false) => Ok(Part::Source),
        (name, _) if is_safe_word(name) => Ok(Part::Field {
            name: name.to_string(),
            inside_data,
        }),
        _ => Err(format!(
            "`{{{inside}}}`: a placeholder is {{event}}, {{source}}, {{field}} or {{data.field}}, \
             with a field name of letters, digits, `-` and `_`"
        )),
    }
}

fn safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn is_safe_word(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_WORD && value.bytes().all(safe_byte)
}

/// At most AMQP's 255 bytes, cut at a character boundary (only a very long event type gets
/// there).
fn truncate(mut key: String) -> String {
    if key.len() > MAX_KEY {
        let mut end = MAX_KEY;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &str) -> OutboxRecord {
        OutboxRecord {
            key: "k".into(),
            event: "call.ended".into(),
            signature: String::new(),
            received_at_ms: 0,
            source: "staging".into(),
            body: body.as_bytes().to_vec(),
            redelivered: false,
            attempts_before: 0,
            delivery_id: None,
            trace: None,
        }
    }

    fn render(template: &str, body: &str) -> String {
        RoutingKey::parse(template).unwrap().render(&record(body))
    }

    #[test]
    fn the_default_is_the_event_type() {
        assert_eq!(RoutingKey::default(), RoutingKey::parse("{event}").unwrap());
        assert_eq!(render("{event}", "{}"), "call.ended");
    }

    #[test]
    fn fields_sources_and_literals_are_filled_in() {
        let body = r#"{"event":"call.ended","region":"eu","data":{"agent_id":"agent_42"}}"#;
        assert_eq!(render("{source}.{event}", body), "staging.call.ended");
        assert_eq!(
            render("{event}.{data.agent_id}", body),
            "call.ended.agent_42"
        );
        assert_eq!(
            render("kallina.{region}.{event}", body),
            "kallina.eu.call.ended"
        );
    }

    #[test]
    fn a_payload_cannot_inject_words_or_wildcards() {
        for value in [
            r#""a.b""#,
            r##""#""##,
            r#""*""#,
            r#""""#,
            r#"42"#,
            r#"{"x":1}"#,
            r#""agent 42""#,
            r#""ágent""#,
            r#"null"#,
        ] {
            let body = format!(r#"{{"data":{{"agent_id":{value}}}}}"#);
            assert_eq!(
                render("{event}.{data.agent_id}", &body),
                "call.ended._",
                "{value}"
            );
        }
        let long = "a".repeat(65);
        let body = format!(r#"{{"data":{{"agent_id":"{long}"}}}}"#);
        assert_eq!(render("{data.agent_id}", &body), "_");
        assert_eq!(render("{data.agent_id}", r#"{"data":"x"}"#), "_");
        assert_eq!(render("{data.agent_id}", "not json"), "_");
    }

    #[test]
    fn bad_templates_are_refused() {
        for (bad, why) in [
            ("", "empty"),
            ("{event", "unclosed"),
            ("{nope.x}", "placeholder"),
            ("{data.}", "placeholder"),
            ("a#.{event}", "literal"),
            ("{event}.*", "literal"),
        ] {
            let err = RoutingKey::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_key_never_exceeds_255_bytes() {
        let mut r = record("{}");
        r.event = "é".repeat(200);
        let key = RoutingKey::parse("{event}.{source}").unwrap().render(&r);
        assert!(key.len() <= 255);
    }
}
