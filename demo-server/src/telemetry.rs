//! Logs to stderr, and (feature `otel`) traces exported over OTLP/gRPC.

use anyhow::Context as _;
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::config::LogFormat;

/// Keeps the trace exporter alive; dropping it flushes the spans still queued, within what the
/// shutdown grace has left ([`shutdown_by`]), so it must be dropped inside the tokio runtime,
/// before the runtime itself.
#[derive(Debug)]
pub(crate) struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// When the process must be gone: the shutdown signal's time plus the grace. Unset (no signal, an
/// error exit), the flush at exit gets [`FLUSH_WITHOUT_DEADLINE`].
static SHUTDOWN_BY: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// The flush's time when no shutdown deadline was set.
#[cfg(feature = "otel")]
const FLUSH_WITHOUT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The flush's least time, even when the drain used the whole grace: one export round trip.
#[cfg(feature = "otel")]
const FLUSH_AT_LEAST: std::time::Duration = std::time::Duration::from_millis(100);

/// Records when the process must be gone (`SIGTERM` + `shutdown_grace_secs`), so the span flush
/// at exit fits in the same grace instead of adding to it (an orchestrator kills at its own
/// deadline, which the grace is set to match).
pub(crate) fn shutdown_by(deadline: std::time::Instant) {
    let _ = SHUTDOWN_BY.set(deadline);
}

/// How long the flush at exit may take.
#[cfg(feature = "otel")]
fn flush_budget() -> std::time::Duration {
    SHUTDOWN_BY
        .get()
        .map_or(FLUSH_WITHOUT_DEADLINE, |by| by.saturating_duration_since(std::time::Instant::now()))
        .max(FLUSH_AT_LEAST)
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(flush_budget())
        {
            eprintln!("demo-server: the OTLP exporter did not flush its spans within the shutdown grace: {error}");
        }
    }
}

/// Installs the global subscriber: the logs (`RUST_LOG`, default `info`) in `format`, plus,
/// built with `--features otel` and when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, every span exported over OTLP/gRPC — the HTTP
/// request span carries the request id (`request_id`). The exporter reads the standard `OTEL_*`
/// variables (`OTEL_SERVICE_NAME`, default `demo-server`; `OTEL_BSP_SCHEDULE_DELAY`; ...). Call
/// it inside the tokio runtime (the gRPC exporter needs one).
pub(crate) fn init(format: LogFormat) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().flatten_event(true).boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    #[cfg(feature = "otel")]
    {
        let provider = otel_provider()?;
        let traces = provider.as_ref().map(|provider| {
            use opentelemetry::trace::TracerProvider as _;
            // Spans at info and above (the request span), whatever RUST_LOG says of the logs.
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("demo-server"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        });
        registry.with(traces).try_init().context("cannot install the tracing subscriber")?;
        Ok(Telemetry { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.try_init().context("cannot install the tracing subscriber")?;
        Ok(Telemetry {})
    }
}

#[cfg(feature = "otel")]
fn otel_provider() -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .context("invalid OTLP exporter settings (OTEL_EXPORTER_OTLP_*)")?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "demo-server".to_owned());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    Ok(Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}
