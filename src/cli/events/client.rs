//! The admin API's client for `kallina-relay events`: where the API is and its token (flags,
//! else the settings of the service on this host), typed answers, and error answers turned
//! into one line with a hint.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::EventsArgs;
use crate::cli::{client_settings, connectable, error_chain, Failure, ServeArgs};

pub(super) struct AdminClient {
    pub client: reqwest::Client,
    base: Url,
    token: String,
}

/// Which route was asked, so that a 404 can say what it most likely means.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Collection,
    OneEvent,
}

impl AdminClient {
    pub fn new(args: &EventsArgs, global: &ServeArgs) -> Result<Self, Failure> {
        let token = args
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let settings = match (&args.admin_url, token) {
            (Some(_), Some(_)) => None,
            _ => Some(client_settings(global, false)?),
        };
        let base = match (&args.admin_url, &settings) {
            (Some(url), _) => url.clone(),
            (None, Some(settings)) => format!("http://{}", connectable(settings.admin.listen)),
            (None, None) => unreachable!("settings are loaded when --admin-url is absent"),
        };
        let base = match Url::parse(&base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && !url.cannot_be_a_base() => url,
            Ok(_) => {
                return Err(Failure::Usage(format!(
                    "--admin-url {base}: not an http(s) URL"
                )))
            }
            Err(e) => return Err(Failure::Usage(format!("--admin-url {base}: {e}"))),
        };
        let token = match (token, &settings) {
            (Some(token), _) => token.to_string(),
            (None, Some(settings)) => match &settings.admin.token {
                Some(token) => token.expose().to_string(),
                None => {
                    return Err(Failure::Usage(
                        "no admin token: pass --token or set KALLINA_RELAY_ADMIN_TOKEN (the \
                         service's admin_token)"
                            .into(),
                    ))
                }
            },
            (None, None) => unreachable!("settings are loaded when --token is absent"),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .user_agent(concat!(
                "kallina-relay/",
                env!("CARGO_PKG_VERSION"),
                " events"
            ))
            .build()
            .map_err(|e| {
                Failure::Work(format!("cannot build the HTTP client: {}", error_chain(&e)))
            })?;
        Ok(Self {
            client,
            base,
            token,
        })
    }

    /// The base URL with `segments` appended, each percent-encoded: an id may hold any
    /// printable character when the service keys events by a delivery-id header.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked to be a base URL")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        target: Target,
    ) -> Result<T, Failure> {
        let mut request = self
            .client
            .request(method, url.clone())
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            Failure::Work(format!(
                "cannot reach the admin API at {}: {}",
                self.base,
                error_chain(&e)
            ))
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.text().await.map_err(|e| {
            Failure::Work(format!("reading the answer of {url}: {}", error_chain(&e)))
        })?;
        if status.is_success() {
            return serde_json::from_str::<T>(&text).map_err(|e| {
                Failure::Work(format!(
                    "{status} from {url}, but not the answer expected ({e}): {}",
                    text.chars().take(200).collect::<String>()
                ))
            });
        }
        let value = serde_json::from_str::<Value>(&text).ok();
        Err(Failure::Work(error_line(
            status,
            value.as_ref(),
            retry_after,
            target,
        )))
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<T, Failure> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let target = match segments.len() {
            2 => Target::Collection,
            _ => Target::OneEvent,
        };
        self.call(Method::GET, url, None, target).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: Option<Value>,
    ) -> Result<T, Failure> {
        let target = match segments {
            ["admin", "redrive"] => Target::Collection,
            _ => Target::OneEvent,
        };
        self.call(Method::POST, self.url(segments), body, target)
            .await
    }
}

/// One line for an error answer (`401 unauthorized: …`), with a hint where the cause is
/// usually the caller's setup rather than the event.
fn error_line(
    status: StatusCode,
    body: Option<&Value>,
    retry_after: Option<String>,
    target: Target,
) -> String {
    let error = body.map(|b| &b["error"]);
    let text = |key: &str| error.and_then(|e| e[key].as_str()).map(str::to_string);
    let code = text("code").unwrap_or_else(|| "error".into());
    let mut line = format!(
        "{} {code}: {}",
        status.as_u16(),
        text("message").unwrap_or_else(|| status.canonical_reason().unwrap_or("").into())
    );
    if let Some(seconds) = retry_after {
        line.push_str(&format!(" (retry after {seconds}s)"));
    }
    if let Some(request_id) = text("request_id") {
        line.push_str(&format!(" [{request_id}]"));
    }
    let hint = match (status.as_u16(), target) {
        (401, _) => Some(
            "the token (--token or KALLINA_RELAY_ADMIN_TOKEN) must be the service's admin_token",
        ),
        (404, Target::Collection) => Some(
            "the admin API answers 404 to everything while the service has no admin_token \
             (KALLINA_RELAY_ADMIN_TOKEN); is --admin-url its admin listener?",
        ),
        (404, Target::OneEvent) => Some(
            "no stored event has this id (its dedup key, as `events list` shows it), or the \
             admin API is off",
        ),
        _ => None,
    };
    if let Some(hint) = hint {
        line.push_str("\nhint: ");
        line.push_str(hint);
    }
    line
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_error_answer_is_one_line_and_a_hint() {
        let body = json!({"error": {"code": "unauthorized", "message": "a token is required",
                                    "details": {}, "request_id": "req_1"}});
        let line = error_line(
            StatusCode::UNAUTHORIZED,
            Some(&body),
            None,
            Target::OneEvent,
        );
        let mut lines = line.lines();
        assert_eq!(
            lines.next(),
            Some("401 unauthorized: a token is required [req_1]")
        );
        assert!(lines.next().unwrap().contains("KALLINA_RELAY_ADMIN_TOKEN"));
    }
}
