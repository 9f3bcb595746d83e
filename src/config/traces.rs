//! The trace settings of `[telemetry]`: OTLP export of spans, configured the way every
//! OpenTelemetry SDK is.
//!
//! Contract: each setting comes from the proxy's own key in `[telemetry]` (the file, or its
//! `CREDYT_PROXY__TELEMETRY__...` override) when set, else from its standard `OTEL_*`
//! environment variable, else from the OpenTelemetry default. Traces are off (no exporter, no
//! span processor, nothing buffered) unless an endpoint comes from one of them, or when
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Only `http/protobuf` is built in;
//! any other protocol, an unknown sampler or a malformed value is a configuration error, with
//! every other problem of the configuration.
//!
//! | key in `[telemetry]` | variable | default |
//! |---|---|---|
//! | `traces_endpoint` (full URL) | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | |
//! | `endpoint` (base URL; `/v1/traces` is appended) | `OTEL_EXPORTER_OTLP_ENDPOINT` | off |
//! | `protocol` | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` |
//! | `service_name` | `OTEL_SERVICE_NAME` (then `service.name` of the attributes) | `credyt-proxy` |
//! | `resource_attributes` (`k=v,k2=v2`) | `OTEL_RESOURCE_ATTRIBUTES` (merged; the key's win) | |
//! | `traces_sampler` | `OTEL_TRACES_SAMPLER` | `parentbased_always_on` |
//! | `traces_sampler_arg` | `OTEL_TRACES_SAMPLER_ARG` | `1.0` |
//! | `traces_max_queue_size` | `OTEL_BSP_MAX_QUEUE_SIZE` | 2048 |
//! | `traces_max_export_batch_size` | `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | 512 |
//! | `traces_schedule_delay_ms` | `OTEL_BSP_SCHEDULE_DELAY` | 5000 |
//! | `traces_export_timeout_ms` | `OTEL_BSP_EXPORT_TIMEOUT`, `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, `OTEL_EXPORTER_OTLP_TIMEOUT` | 10000 |
//!
//! Headers for the collector (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TRACES_HEADERS`) are read by
//! the exporter itself; they may hold credentials and are never logged.

use std::collections::HashMap;
use std::time::Duration;

use super::raw::RawTelemetry;
use super::Problems;

pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
pub const OTEL_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
pub const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
pub const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
pub const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
pub const OTEL_TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
pub const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
pub const OTEL_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
pub const OTEL_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
pub const OTEL_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
pub const OTEL_BSP_EXPORT_TIMEOUT: &str = "OTEL_BSP_EXPORT_TIMEOUT";
pub const OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
pub const OTEL_EXPORTER_OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";

/// The service name when nothing sets one.
pub const DEFAULT_SERVICE_NAME: &str = "credyt-proxy";

/// Which spans are recorded and exported (the OpenTelemetry samplers, by their
/// `OTEL_TRACES_SAMPLER` names). A span that delivers records to Credyt is also sampled when
/// any tenant request it links to was (see `telemetry::traces`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerSetting {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

/// Validated trace export settings; present only when traces are on.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The full URL spans are posted to (OTLP/HTTP, protobuf).
    pub endpoint: String,
    pub service_name: String,
    /// Resource attributes besides `service.name`, in key order.
    pub resource_attributes: Vec<(String, String)>,
    pub sampler: SamplerSetting,
    /// Finished spans waiting for export; a span that finds the queue full is dropped and
    /// counted, never waited for.
    pub max_queue_size: usize,
    pub max_export_batch_size: usize,
    /// The longest a finished span waits before its batch is sent.
    pub schedule_delay: Duration,
    pub export_timeout: Duration,
}

/// The `OTEL_*` variables of `env` (a test's map, or the process environment).
pub(crate) fn otel_vars(env: Option<&HashMap<String, String>>) -> HashMap<String, String> {
    match env {
        Some(env) => env
            .iter()
            .filter(|(k, _)| k.starts_with("OTEL_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => std::env::vars()
            .filter(|(k, _)| k.starts_with("OTEL_"))
            .collect(),
    }
}

/// One setting's value and where it came from (the key named in errors).
struct Source<'a> {
    raw: &'a RawTelemetry,
    env: &'a HashMap<String, String>,
}

impl<'a> Source<'a> {
    fn var(&self, name: &'static str) -> Option<(&'static str, &'a str)> {
        self.env
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(|v| (name, v))
    }

    /// The key of `[telemetry]` if set, else the first of `vars` that is set.
    fn text(
        &self,
        key: &'static str,
        own: &'a Option<String>,
        vars: &[&'static str],
    ) -> Option<(&'static str, &'a str)> {
        own.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| (key, v))
            .or_else(|| vars.iter().find_map(|name| self.var(name)))
    }

    /// A number from the key, else from the variables (parsed), else `default`.
    fn number(
        &self,
        p: &mut Problems,
        key: &'static str,
        own: Option<u64>,
        vars: &[&'static str],
        default: u64,
    ) -> u64 {
        if let Some(v) = own {
            return p.nonzero(key, v);
        }
        match vars.iter().find_map(|name| self.var(name)) {
            Some((name, text)) => match text.parse::<u64>() {
                Ok(v) => p.nonzero(name, v),
                Err(_) => {
                    p.push(name, format!("`{text}` is not a whole number"));
                    default
                }
            },
            None => default,
        }
    }
}

/// `base` + `/v1/traces`, the signal path of OTLP/HTTP.
fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

fn check_url(p: &mut Problems, key: &str, url: &str) {
    let ok = reqwest::Url::parse(url)
        .ok()
        .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if !ok {
        p.push(key, format!("`{url}` is not an http(s) URL"));
    }
}

/// Parses `k=v,k2=v2` (the `OTEL_RESOURCE_ATTRIBUTES` form; values may be percent-encoded).
fn parse_attributes(p: &mut Problems, key: &str, text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                match crate::domain::percent_decode(v.trim()).map(|v| v.into_owned()) {
                    Some(v) => out.push((k.trim().to_string(), v)),
                    None => p.push(key, format!("the value of `{}` is not valid", k.trim())),
                }
            }
            _ => p.push(key, format!("`{pair}` is not key=value")),
        }
    }
    out
}

fn sampler(p: &mut Problems, s: &Source<'_>) -> SamplerSetting {
    let arg = match s.raw.traces_sampler_arg {
        Some(v) => Some(("telemetry.traces_sampler_arg", v)),
        None => match s.var(OTEL_TRACES_SAMPLER_ARG) {
            Some((name, text)) => match text.parse::<f64>() {
                Ok(v) => Some((name, v)),
                Err(_) => {
                    p.push(name, format!("`{text}` is not a number"));
                    None
                }
            },
            None => None,
        },
    };
    let ratio = match arg {
        Some((key, v)) if !(0.0..=1.0).contains(&v) => {
            p.push(key, "must be between 0 and 1");
            1.0
        }
        Some((_, v)) => v,
        None => 1.0,
    };
    let Some((key, name)) = s.text(
        "telemetry.traces_sampler",
        &s.raw.traces_sampler,
        &[OTEL_TRACES_SAMPLER],
    ) else {
        return SamplerSetting::ParentBasedAlwaysOn;
    };
    match name {
        "always_on" => SamplerSetting::AlwaysOn,
        "always_off" => SamplerSetting::AlwaysOff,
        "traceidratio" => SamplerSetting::TraceIdRatio(ratio),
        "parentbased_always_on" => SamplerSetting::ParentBasedAlwaysOn,
        "parentbased_always_off" => SamplerSetting::ParentBasedAlwaysOff,
        "parentbased_traceidratio" => SamplerSetting::ParentBasedTraceIdRatio(ratio),
        other => {
            p.push(
                key,
                format!(
                    "`{other}` is not one of: always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            );
            SamplerSetting::ParentBasedAlwaysOn
        }
    }
}

/// The trace settings, or `None` when traces are off. Problems go to `p`; the `OTEL_*`
/// variables are only judged when they would be used (an endpoint is configured).
pub(crate) fn resolve(
    p: &mut Problems,
    raw: &RawTelemetry,
    env: &HashMap<String, String>,
) -> Option<TraceSettings> {
    let all = Source { raw, env };
    let disabled = all
        .var(OTEL_SDK_DISABLED)
        .is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"));
    let exporter_off = match all.var(OTEL_TRACES_EXPORTER) {
        None | Some((_, "otlp")) => false,
        Some((_, "none")) => true,
        Some((name, other)) => {
            p.push(name, format!("`{other}` is not supported (otlp or none)"));
            true
        }
    };
    let endpoint = if let Some((key, url)) =
        all.text("telemetry.traces_endpoint", &raw.traces_endpoint, &[])
    {
        Some((key, url.to_string()))
    } else if let Some((key, base)) = all.text("telemetry.endpoint", &raw.endpoint, &[]) {
        Some((key, traces_url(base)))
    } else if let Some((key, url)) = all.var(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
        Some((key, url.to_string()))
    } else {
        all.var(OTEL_EXPORTER_OTLP_ENDPOINT)
            .map(|(key, base)| (key, traces_url(base)))
    };
    let endpoint = endpoint.filter(|_| !disabled && !exporter_off);
    // Without an endpoint the variables are not used, so they are not judged either; the
    // keys of `[telemetry]` always are.
    let none = HashMap::new();
    let s = Source {
        raw,
        env: if endpoint.is_some() { env } else { &none },
    };
    if let Some((key, url)) = &endpoint {
        check_url(p, key, url);
    }
    if let Some((key, protocol)) = s.text(
        "telemetry.protocol",
        &raw.protocol,
        &[
            OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
            OTEL_EXPORTER_OTLP_PROTOCOL,
        ],
    ) {
        if protocol != "http/protobuf" {
            p.push(
                key,
                format!("`{protocol}` is not supported by this build (http/protobuf only)"),
            );
        }
    }
    let mut attributes: Vec<(String, String)> = Vec::new();
    let sources = [
        s.var(OTEL_RESOURCE_ATTRIBUTES),
        raw.resource_attributes
            .as_deref()
            .map(|v| ("telemetry.resource_attributes", v)),
    ];
    for (key, text) in sources.into_iter().flatten() {
        for (k, v) in parse_attributes(p, key, text) {
            attributes.retain(|(old, _)| *old != k);
            attributes.push((k, v));
        }
    }
    attributes.sort();
    let from_attributes = attributes
        .iter()
        .position(|(k, _)| k == "service.name")
        .map(|i| attributes.remove(i).1);
    let service_name = s
        .text(
            "telemetry.service_name",
            &raw.service_name,
            &[OTEL_SERVICE_NAME],
        )
        .map(|(_, v)| v.to_string())
        .or(from_attributes)
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    let sampler = sampler(p, &s);
    let max_queue_size = s.number(
        p,
        "telemetry.traces_max_queue_size",
        raw.traces_max_queue_size,
        &[OTEL_BSP_MAX_QUEUE_SIZE],
        2048,
    );
    let max_export_batch_size = s.number(
        p,
        "telemetry.traces_max_export_batch_size",
        raw.traces_max_export_batch_size,
        &[OTEL_BSP_MAX_EXPORT_BATCH_SIZE],
        512,
    );
    if max_export_batch_size > max_queue_size {
        p.push(
            "telemetry.traces_max_export_batch_size",
            format!("{max_export_batch_size} is above the queue size ({max_queue_size})"),
        );
    }
    if max_queue_size > 1_000_000 {
        p.push("telemetry.traces_max_queue_size", "must be at most 1000000");
    }
    let schedule_delay = Duration::from_millis(s.number(
        p,
        "telemetry.traces_schedule_delay_ms",
        raw.traces_schedule_delay_ms,
        &[OTEL_BSP_SCHEDULE_DELAY],
        5_000,
    ));
    let export_timeout = Duration::from_millis(s.number(
        p,
        "telemetry.traces_export_timeout_ms",
        raw.traces_export_timeout_ms,
        &[
            OTEL_BSP_EXPORT_TIMEOUT,
            OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
            OTEL_EXPORTER_OTLP_TIMEOUT,
        ],
        10_000,
    ));
    endpoint.map(|(_, endpoint)| TraceSettings {
        endpoint,
        service_name,
        resource_attributes: attributes,
        sampler,
        max_queue_size: max_queue_size as usize,
        max_export_batch_size: max_export_batch_size as usize,
        schedule_delay,
        export_timeout,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Settings;

    use super::*;

    const MINIMAL: &str = "[credyt]\nbase_url = \"http://127.0.0.1:1\"\napi_key = \"k\"\n";

    fn load(extra: &str, env: &[(&str, &str)]) -> Result<Settings, crate::config::ConfigErrors> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_toml(&format!("{MINIMAL}{extra}"), Path::new("."), Some(env))
    }

    fn traces(extra: &str, env: &[(&str, &str)]) -> Option<TraceSettings> {
        load(extra, env).unwrap().telemetry.traces
    }

    #[test]
    fn off_without_an_endpoint_whatever_else_is_set() {
        assert_eq!(traces("", &[]), None);
        assert_eq!(
            traces(
                "[telemetry]\nservice_name = \"x\"\ntraces_sampler = \"always_on\"\n",
                &[(OTEL_SERVICE_NAME, "y"), (OTEL_TRACES_SAMPLER, "xray")]
            ),
            None
        );
    }

    #[test]
    fn the_standard_variables_configure_it() {
        let t = traces(
            "",
            &[
                (OTEL_EXPORTER_OTLP_ENDPOINT, "http://collector:4318/"),
                (OTEL_SERVICE_NAME, "billing-sidecar"),
                (
                    OTEL_RESOURCE_ATTRIBUTES,
                    "deployment.environment=prod,k8s.pod.name=p%2D1",
                ),
                (OTEL_TRACES_SAMPLER, "parentbased_traceidratio"),
                (OTEL_TRACES_SAMPLER_ARG, "0.01"),
                (OTEL_BSP_SCHEDULE_DELAY, "200"),
            ],
        )
        .unwrap();
        assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(t.service_name, "billing-sidecar");
        assert_eq!(
            t.resource_attributes,
            vec![
                ("deployment.environment".to_string(), "prod".to_string()),
                ("k8s.pod.name".to_string(), "p-1".to_string()),
            ]
        );
        assert_eq!(t.sampler, SamplerSetting::ParentBasedTraceIdRatio(0.01));
        assert_eq!(t.schedule_delay, Duration::from_millis(200));
        assert_eq!(t.max_queue_size, 2048);
        // The signal's own variable is used as it is.
        let t = traces(
            "",
            &[
                (OTEL_EXPORTER_OTLP_ENDPOINT, "http://a:4318"),
                (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "http://b:4318/custom"),
            ],
        )
        .unwrap();
        assert_eq!(t.endpoint, "http://b:4318/custom");
        assert_eq!(t.service_name, DEFAULT_SERVICE_NAME);
        assert_eq!(t.sampler, SamplerSetting::ParentBasedAlwaysOn);
    }

    #[test]
    fn keys_of_the_section_win_over_the_variables() {
        let t = traces(
            "[telemetry]\nendpoint = \"http://own:4318\"\nservice_name = \"own\"\n\
             resource_attributes = \"team=billing,service.name=ignored\"\n\
             traces_sampler = \"traceidratio\"\ntraces_sampler_arg = 0.25\n",
            &[
                (
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
                    "http://env:4318/v1/traces",
                ),
                (OTEL_SERVICE_NAME, "env"),
                (OTEL_RESOURCE_ATTRIBUTES, "team=env,region=eu"),
                (OTEL_TRACES_SAMPLER, "always_off"),
            ],
        )
        .unwrap();
        assert_eq!(t.endpoint, "http://own:4318/v1/traces");
        assert_eq!(t.service_name, "own");
        assert_eq!(
            t.resource_attributes,
            vec![
                ("region".to_string(), "eu".to_string()),
                ("team".to_string(), "billing".to_string()),
            ]
        );
        assert_eq!(t.sampler, SamplerSetting::TraceIdRatio(0.25));
    }

    #[test]
    fn the_proxy_overrides_set_them_too() {
        let t = traces(
            "",
            &[
                (
                    "CREDYT_PROXY__TELEMETRY__TRACES_ENDPOINT",
                    "https://otel.example/v1/traces",
                ),
                ("CREDYT_PROXY__TELEMETRY__TRACES_SAMPLER_ARG", "0.5"),
                (
                    "CREDYT_PROXY__TELEMETRY__TRACES_SAMPLER",
                    "parentbased_traceidratio",
                ),
            ],
        )
        .unwrap();
        assert_eq!(t.endpoint, "https://otel.example/v1/traces");
        assert_eq!(t.sampler, SamplerSetting::ParentBasedTraceIdRatio(0.5));
    }

    #[test]
    fn disabled_by_the_standard_switches() {
        let on = (OTEL_EXPORTER_OTLP_ENDPOINT, "http://c:4318");
        assert!(traces("", &[on]).is_some());
        assert_eq!(traces("", &[on, (OTEL_SDK_DISABLED, "true")]), None);
        assert_eq!(traces("", &[on, (OTEL_TRACES_EXPORTER, "none")]), None);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let errs = load(
            "[telemetry]\nendpoint = \"ftp://x\"\ntraces_sampler_arg = 2.0\n\
             traces_max_export_batch_size = 10000\n",
            &[
                (OTEL_TRACES_SAMPLER, "xray"),
                (OTEL_EXPORTER_OTLP_PROTOCOL, "grpc"),
                (OTEL_RESOURCE_ATTRIBUTES, "novalue"),
                (OTEL_BSP_SCHEDULE_DELAY, "soon"),
            ],
        )
        .unwrap_err();
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "telemetry.endpoint",
            "telemetry.traces_sampler_arg",
            "telemetry.traces_max_export_batch_size",
            OTEL_TRACES_SAMPLER,
            OTEL_EXPORTER_OTLP_PROTOCOL,
            OTEL_RESOURCE_ATTRIBUTES,
            OTEL_BSP_SCHEDULE_DELAY,
        ] {
            assert!(keys.contains(&key), "{key} missing from {errs}");
        }
        let errs = load("[telemetry]\nendpont = \"http://x\"\n", &[]).unwrap_err();
        assert!(errs.to_string().contains("endpont"), "{errs}");
    }
}
