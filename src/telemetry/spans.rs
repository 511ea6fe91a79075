//! Optional export of each event's spans over OTLP/HTTP: `receive` (the request, a child of
//! the caller's span when it sent a `traceparent`), `store` (the durable write, inside
//! `receive`) and `publish` (from the publish to the broker's confirm, a child of `receive`,
//! whose id is the `traceparent` the message carries). Off unless `otlp_endpoint` is set.
//!
//! Spans are made when they are over, from the times and ids the stages kept, and handed to
//! the SDK's batch processor: a bounded queue drained by a thread of its own, so a slow or
//! absent collector costs a request nothing (spans beyond the queue are dropped, never
//! waited for).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::{Setting, Spec};
use crate::trace::TraceContext;

pub const OTLP_ENDPOINT: Setting<Option<String>> = Setting::new(
    Spec::new(
        "otlp_endpoint",
        "KALLINA_RELAY_OTLP_ENDPOINT",
        "OTLP/HTTP collector to export spans to (receive, store, publish), e.g. \
         `http://collector:4318`; spans go to `<endpoint>/v1/traces`",
    )
    .note("unset: no export"),
    |f| match f.optional() {
        None => Ok(None),
        Some(url) => match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(Some(url.to_string())),
            _ => Err(f.invalid("an http:// or https:// URL")),
        },
    },
);
pub const OTLP_PROTOCOL: Setting<OtlpProtocol> = Setting::new(
    Spec::new(
        "otlp_protocol",
        "KALLINA_RELAY_OTLP_PROTOCOL",
        "OTLP encoding: `http/protobuf` or `http/json`",
    )
    .default("http/protobuf"),
    |f| match f.non_empty()? {
        "http/protobuf" => Ok(OtlpProtocol::Protobuf),
        "http/json" => Ok(OtlpProtocol::Json),
        _ => Err(f.invalid("`http/protobuf` or `http/json`")),
    },
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Protobuf,
    Json,
}

/// Where spans go, when anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpOptions {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
}

/// A span that is over: what it was, in which trace, when.
pub struct FinishedSpan<'a> {
    pub name: &'static str,
    pub kind: SpanKind,
    /// Its trace, its own id (`span_id`) and its parent (`parent_span_id`).
    pub context: &'a TraceContext,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The exporter, or nothing. Cheap to clone; every stage holds one.
#[derive(Clone, Default)]
pub struct Spans {
    export: Option<(SdkTracerProvider, SdkTracer)>,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.export.is_some() {
            "Spans(otlp)"
        } else {
            "Spans(off)"
        })
    }
}

impl Spans {
    /// No export: spans are dropped where they end.
    pub fn off() -> Self {
        Self::default()
    }

    /// The exporter for `options`. Built on a thread of its own: the blocking HTTP client
    /// owns a runtime, which must not be made (or dropped) inside the service's.
    pub fn start(options: &OtlpOptions) -> anyhow::Result<Self> {
        let options = options.clone();
        let built = std::thread::spawn(move || -> anyhow::Result<SdkTracerProvider> {
            let url = traces_url(&options.endpoint);
            let protocol = match options.protocol {
                OtlpProtocol::Protobuf => Protocol::HttpBinary,
                OtlpProtocol::Json => Protocol::HttpJson,
            };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol)
                .with_endpoint(url)
                .with_timeout(Duration::from_secs(10))
                .build()?;
            Ok(SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name("kallina-relay")
                        .build(),
                )
                .build())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))??;
        let tracer = built.tracer("kallina-relay");
        Ok(Self {
            export: Some((built, tracer)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.export.is_some()
    }

    /// Hands a finished span to the exporter (nothing when export is off or the trace is not
    /// sampled).
    pub fn export(&self, span: FinishedSpan<'_>) {
        let Some((_, tracer)) = &self.export else {
            return;
        };
        let ctx = span.context;
        let (Ok(trace_id), Ok(span_id)) = (
            TraceId::from_hex(&ctx.trace_id),
            SpanId::from_hex(&ctx.span_id),
        ) else {
            return;
        };
        let flags = TraceFlags::new(ctx.flags);
        let parent = match ctx.parent_span_id.as_deref().map(SpanId::from_hex) {
            Some(Ok(parent)) => Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                parent,
                flags,
                true,
                TraceState::default(),
            )),
            _ => Context::new(),
        };
        let mut builder = tracer
            .span_builder(Cow::Borrowed(span.name))
            .with_kind(span.kind)
            .with_start_time(span.start)
            .with_attributes(span.attributes);
        builder.trace_id = Some(trace_id);
        builder.span_id = Some(span_id);
        let mut sdk_span = builder.start_with_context(tracer, &parent);
        if let Some(error) = span.error {
            sdk_span.set_status(Status::error(error));
        }
        sdk_span.end_with_timestamp(span.end);
    }

    /// Sends what is queued; at stop.
    pub fn shutdown(&self) {
        if let Some((provider, _)) = &self.export {
            let provider = provider.clone();
            // The exporter's blocking client must not be driven from the service's runtime.
            let _ = std::thread::spawn(move || {
                if let Err(e) = provider.shutdown() {
                    tracing::warn!(error = %e, "flushing spans to the OTLP collector failed");
                }
            })
            .join();
        }
    }
}

/// `<endpoint>/v1/traces`, unless the endpoint names a path of its own.
fn traces_url(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(url) if url.path() == "/" || url.path().is_empty() => {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
        _ => endpoint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_to_a_bare_endpoint() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://x.example/otlp/v1/traces"),
            "https://x.example/otlp/v1/traces"
        );
    }
}
