//! OpenTelemetry export of the spans of the control service, MCP and payments (OTLP over HTTP,
//! JSON), when an endpoint is configured (`log.otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`). The standard
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` apply.
//!
//! The proxy's request path has no spans: the layer takes only the control-side targets below,
//! so a proxy node pays nothing for it. An incoming W3C `traceparent` on the control service's
//! HTTP listener becomes the parent of its spans ([`http_span`]).

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::Targets;

/// The exporter's provider, shut down (its last spans flushed) by [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The crates whose spans are exported: the control service, MCP, payments, and the app's
/// HTTP span around them.
const TARGETS: [&str; 4] = [
    "tollgate_app",
    "tollgate_control",
    "tollgate_mcp",
    "tollgate_payments",
];

/// Whether export is asked for: by the settings or by the standard environment.
fn endpoint_configured(configured: Option<&str>) -> bool {
    configured.is_some()
        || [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// The tracing layer that exports spans, or `None` when no endpoint is configured (or the
/// exporter cannot be built: logged, the process runs without it).
pub(crate) fn layer<S>(
    configured: Option<&str>,
    service: &str,
) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    if !endpoint_configured(configured) {
        return None;
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson);
    if let Some(base) = configured {
        builder = builder.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = match builder.build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tollgate: OpenTelemetry export is off: {e}");
            return None;
        }
    };
    // OTEL_SERVICE_NAME wins over our default (the resource builder reads it).
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("tollgate");
    let _ = PROVIDER.set(provider);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let targets = TARGETS.iter().fold(Targets::new(), |t, name| {
        t.with_target(*name, tracing::Level::INFO)
    });
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(targets),
    )
}

/// Flushes the spans still buffered and stops the exporter (at the end of the process).
pub fn shutdown() {
    // Bounded: an unreachable collector does not hold the exit up.
    if let Some(p) = PROVIDER.get()
        && let Err(e) = p.shutdown_with_timeout(std::time::Duration::from_secs(2))
    {
        tracing::warn!(error = %e, "OpenTelemetry: spans not flushed at exit");
    }
}

/// The paths of the control service's listener a span names; any other is `other` (a
/// caller's path is not echoed into traces or logs).
const PATHS: [&str; 5] = ["/mcp", "/v1/top-up", "/healthz", "/livez", "/readyz"];

/// The span of one HTTP request to the control service, child of the caller's W3C trace
/// context (`traceparent`, `tracestate`) when it sent one. Only the method and a known path
/// are recorded, never a query string or a header value.
pub(crate) fn http_span(req: &http::Request<axum::body::Body>) -> tracing::Span {
    let path = PATHS
        .iter()
        .find(|p| **p == req.uri().path())
        .copied()
        .unwrap_or("other");
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "DELETE" | "OPTIONS" | "HEAD" | "PUT") => m,
        _ => "other",
    };
    let span = tracing::info_span!(
        target: "tollgate_app",
        "http.request",
        otel.kind = "server",
        http.request.method = method,
        url.path = path,
        http.response.status_code = tracing::field::Empty,
    );
    if PROVIDER.get().is_some() {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(req.headers())));
        let _ = span.set_parent(parent);
    }
    span
}

/// The W3C trace context headers of a request, as the propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Axum middleware: each request runs in its [`http_span`], which records the answer's status.
pub(crate) async fn trace_requests(
    req: http::Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let mut req = req;
    let span = http_span(&req);
    // For the MCP session's task, which runs tool calls outside this request's span.
    req.extensions_mut().insert(span.clone());
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    resp
}

/// `GET /metrics`: `registry` in the Prometheus text format.
pub fn metrics_route(registry: prometheus::Registry) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let registry = registry.clone();
        async move {
            let mut out = String::new();
            let _ = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out);
            out
        }
    })
}
