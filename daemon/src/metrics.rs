//! Prometheus metrics: with `[metrics] listen`, an HTTP endpoint serving `/metrics` in the
//! OpenMetrics text format (prometheus-client encodes it, hyper serves it).
//!
//! Everything is read when scraped from what the daemon counts anyway (the `status` command's
//! figures, each pool's latency buckets and errors by code, two indexed queries, /proc): the
//! hot path pays two atomic adds per answer (its bucket, the sum), an error a short lock, and
//! a scrape about what a `status` command does.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Control;

/// Connections served at once; one more is closed at once.
pub const CONNECTIONS: usize = 4;
/// A request's headers must have come by then.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection still open by then is closed (one request each: no keep-alive).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// 2025-01-01 in ms: a time before it was taken on a clock not yet set.
const CLOCK_SET_MS: i64 = 1_735_689_600_000;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answer scrapes on `listener` until `cancel`, at most as many at once as `slots` holds.
pub async fn serve(
    listener: TcpListener,
    control: Control,
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => match a {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        // Every slot taken (slow or idle clients): this one is closed rather than left to
        // wait behind them.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let control = control.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let control = control.clone();
                async move { Ok::<_, Infallible>(respond(req, &control).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

async fn respond(req: Request<hyper::body::Incoming>, control: &Control) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", kind)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "tern serves /metrics only\n".into(),
        );
    }
    if req.method() == Method::HEAD {
        return reply(StatusCode::OK, CONTENT_TYPE, String::new());
    }
    if req.method() != Method::GET {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        );
        r.headers_mut().insert(
            "allow",
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match render(control).await {
        Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("metrics unavailable: {e}\n"),
        ),
    }
}

/// The exposition of the daemon's figures now.
pub async fn render(control: &Control) -> Result<String, String> {
    let status = control.status().await.map_err(|e| e.to_string())?;
    let (oldest_ms, updates) = control.store_figures().await.map_err(|e| e.to_string())?;
    let waiting = oldest_ms.is_some();
    let pools = control.pools();
    let histograms = pools
        .iter()
        .map(|p| {
            (
                p.name().to_string(),
                p.active().version().to_string(),
                p.stats().durations.buckets(),
            )
        })
        .collect();
    let errors = pools
        .iter()
        .flat_map(|p| {
            let name = p.name().to_string();
            p.stats()
                .errors_by_code()
                .into_iter()
                .map(move |(code, n)| (labels(&[("model", &name), ("code", code)]), n))
        })
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    // A message made before the clock was set (a box without a real-time clock, before NTP)
    // has no age to tell: no sample rather than fifty years.
    let oldest_ms = oldest_ms.filter(|t| *t >= CLOCK_SET_MS);
    let snapshot = Snapshot {
        status,
        histograms,
        errors,
        // An empty outbox waits for nothing: 0.
        outbox_oldest_s: match (oldest_ms, waiting) {
            (Some(t), _) => Some((now_ms - t).max(0) as f64 / 1000.0),
            (None, false) => Some(0.0),
            (None, true) => None,
        },
        updates,
        rss_bytes: crate::fleet::telemetry::rss_bytes(),
        cpu_seconds: crate::fleet::telemetry::cpu_seconds(),
    };
    let mut registry = Registry::with_prefix("tern");
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| e.to_string())?;
    Ok(text)
}

/// What one scrape reports.
#[derive(Debug)]
struct Snapshot {
    status: Value,
    /// Per model: name, active version, (sum s, count, each bucket's own count).
    histograms: Vec<(String, String, Buckets)>,
    /// Failed requests by model and wire code.
    errors: Vec<(Labels, u64)>,
    /// How long the oldest message in the outbox has waited, seconds (`None`: it was made
    /// before the clock was set).
    outbox_oldest_s: Option<f64>,
    /// Each model's latest update: model, version, state.
    updates: Vec<(String, String, String)>,
    rss_bytes: Option<u64>,
    cpu_seconds: Option<f64>,
}

type Labels = Vec<(String, String)>;
/// A histogram as [`crate::engine::PoolStats`] keeps it: sum, count, each bucket's count.
type Buckets = (f64, u64, Vec<(f64, u64)>);
/// A counter's name, help and samples.
type Counter<'a> = (&'a str, &'a str, Vec<(Labels, u64)>);
/// A gauge's name, help and its samples by label set.
type LabelledGauge<'a> = (&'a str, &'a str, Vec<(Labels, i64)>);

/// Label pairs, each value escaped as the text format asks (prometheus-client writes values
/// as given, and a pipeline's name may hold a quote or a backslash).
fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            (k.to_string(), v)
        })
        .collect()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.status;
        let empty = Vec::new();
        let models = s["models"].as_array().unwrap_or(&empty);
        let pipelines = s["pipelines"].as_array().unwrap_or(&empty);
        let text = |v: &Value| v.as_str().unwrap_or("").to_string();

        // Counters: one descriptor, then one sample per label set.
        let counters: [Counter<'_>; 4] = [
            (
                "inference_errors",
                "Failed requests by the code their answer carried (bad_request: an input of the \
                 wrong kind or shape; internal: a run that failed or bytes that decode to no \
                 image; busy: a full queue).",
                self.errors.clone(),
            ),
            (
                "inferences",
                "Requests a model answered or refused, by outcome: ok, error (the model's \
                 fault), bad_input (the caller's), busy (its queue was full).",
                models
                    .iter()
                    .flat_map(|m| {
                        let name = text(&m["name"]);
                        [
                            ("ok", "requests"),
                            ("error", "errors"),
                            ("bad_input", "bad_input"),
                            ("busy", "busy"),
                        ]
                        .map(|(outcome, key)| {
                            (
                                labels(&[("model", &name), ("outcome", outcome)]),
                                n(&m[key]),
                            )
                        })
                    })
                    .collect(),
            ),
            (
                "pipeline_samples",
                "A pipeline's samples by outcome: results, errors, dropped (a full queue), \
                 skipped (thinned), garbage (unreadable), published (sent upstream), captured.",
                pipelines
                    .iter()
                    .flat_map(|p| {
                        let name = text(&p["name"]);
                        let feed = text(&p["feed"]);
                        [
                            "results",
                            "errors",
                            "dropped",
                            "skipped",
                            "garbage",
                            "published",
                            "captured",
                        ]
                        .map(|k| {
                            (
                                labels(&[("pipeline", &name), ("feed", &feed), ("outcome", k)]),
                                n(&p[k]),
                            )
                        })
                    })
                    .collect(),
            ),
            (
                "feed_restarts",
                "Times a pipeline's feed started over (ffmpeg, a reopened port, a reconnect).",
                pipelines
                    .iter()
                    .map(|p| {
                        (
                            labels(&[("pipeline", &text(&p["name"])), ("feed", &text(&p["feed"]))]),
                            n(&p["restarts"]),
                        )
                    })
                    .collect(),
            ),
        ];
        for (name, help, samples) in &counters {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (l, v) in samples {
                m.encode_family(l)?
                    .encode_counter::<NoLabelSet, _, u64>(v, None)?;
            }
        }

        let mut m = e.encode_descriptor(
            "inference_duration",
            "Time a model's answers took in tern (decode, preprocess, run, postprocess).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (name, _, (sum, count, buckets)) in &self.histograms {
            m.encode_family(&labels(&[("model", name)]))?
                .encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
        }
        // Gauges by label set: one descriptor, then one sample per label set. The counts run
        // across versions (an update swaps the model inside its pool): the version serving
        // now is its own series.
        let labelled: [LabelledGauge<'_>; 4] = [
            (
                "model_info",
                "1 for each model, labelled with the version serving now.",
                self.histograms
                    .iter()
                    .map(|(name, version, _)| (labels(&[("model", name), ("version", version)]), 1))
                    .collect(),
            ),
            (
                "queue_depth",
                "Requests waiting for a model's workers.",
                models
                    .iter()
                    .map(|m| {
                        (
                            labels(&[("model", &text(&m["name"]))]),
                            n(&m["queued"]) as i64,
                        )
                    })
                    .collect(),
            ),
            (
                "pipeline_running",
                "1 while a pipeline runs, 0 while it is stopped, starting or failed.",
                pipelines
                    .iter()
                    .map(|p| {
                        (
                            labels(&[("pipeline", &text(&p["name"]))]),
                            i64::from(p["state"] == "running"),
                        )
                    })
                    .collect(),
            ),
            (
                "update_state",
                "1 for each model's latest update, labelled with its version and state \
                 (downloading … committed, failed, rolled_back).",
                self.updates
                    .iter()
                    .map(|(model, version, state)| {
                        let l = [("model", model), ("version", version), ("state", state)];
                        (labels(&l.map(|(k, v)| (k, v.as_str()))), 1)
                    })
                    .collect(),
            ),
        ];
        for (name, help, samples) in &labelled {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (l, v) in samples {
                m.encode_family(l)?.encode_gauge(v)?;
            }
        }
        // Drift, for the pipelines that watch it, once a full window has been compared.
        let watched: Vec<(Labels, f64, i64)> = pipelines
            .iter()
            .filter_map(|p| {
                let d = &p["drift"];
                Some((
                    labels(&[("pipeline", &text(&p["name"]))]),
                    d["score"].as_f64()?,
                    i64::from(d["drifting"] == true),
                ))
            })
            .collect();
        let mut m = e.encode_descriptor(
            "drift_score",
            "How far a pipeline's latest window of answers is from its baseline: the larger PSI \
             of top-1 confidence and of the label mix, less what chance alone gives (over 0.25: \
             a significant shift).",
            None,
            MetricType::Gauge,
        )?;
        for (l, score, _) in &watched {
            m.encode_family(l)?.encode_gauge(score)?;
        }
        let mut m = e.encode_descriptor(
            "drift_detected",
            "1 while a pipeline's drift score is over its threshold (until it falls under 0.8 of it).",
            None,
            MetricType::Gauge,
        )?;
        for (l, _, on) in &watched {
            m.encode_family(l)?.encode_gauge(on)?;
        }

        // Shadows: how far each candidate agrees with its live version, and what was counted.
        let shadows = s["shadows"].as_array().unwrap_or(&empty);
        let mut m = e.encode_descriptor(
            "shadow_agreement",
            "Share of the sampled inputs on which a shadow candidate's answer agrees with the \
             live version's (top-1 label, boxes matched, text, score state).",
            None,
            MetricType::Gauge,
        )?;
        for sh in shadows {
            if let Some(a) = sh["agreement"].as_f64() {
                let l = labels(&[
                    ("model", &text(&sh["model"])),
                    ("version", &text(&sh["version"])),
                ]);
                m.encode_family(&l)?.encode_gauge(&a)?;
            }
        }
        let mut m = e.encode_descriptor(
            "shadow_samples",
            "Sampled inputs of a shadow candidate by outcome: agreed, disagreed (its errors \
             included), dropped (the shadow was busy); counted against the live version, and \
             started over when that changes.",
            None,
            MetricType::Gauge,
        )?;
        for sh in shadows {
            let (all, agreed) = (n(&sh["samples"]), n(&sh["agreed"]));
            for (outcome, v) in [
                ("agreed", agreed),
                ("disagreed", all.saturating_sub(agreed)),
                ("dropped", n(&sh["dropped"])),
            ] {
                let l = [
                    ("model", text(&sh["model"])),
                    ("version", text(&sh["version"])),
                    ("outcome", outcome.to_string()),
                ];
                m.encode_family(&labels(&l.each_ref().map(|(k, v)| (*k, v.as_str()))))?
                    .encode_gauge(&(v as i64))?;
            }
        }

        let gauges: [(&str, &str, Option<Unit>, Option<i64>); 4] = [
            (
                "outbox_backlog_messages",
                "Messages waiting for the broker in the outbox.",
                None,
                s["outbox"]["rows"].as_i64(),
            ),
            (
                "outbox_backlog",
                "Bytes waiting for the broker in the outbox.",
                Some(Unit::Bytes),
                s["outbox"]["bytes"].as_i64(),
            ),
            (
                "fleet_connected",
                "1 while the fleet link is connected to its broker.",
                None,
                s["fleet"]["connected"].as_bool().map(i64::from),
            ),
            (
                "process_resident_memory",
                "Resident memory of ternd.",
                Some(Unit::Bytes),
                self.rss_bytes.map(|b| b as i64),
            ),
        ];
        for (name, help, unit, v) in &gauges {
            if let Some(v) = v {
                e.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?
                    .encode_gauge(v)?;
            }
        }
        if let Some(age) = self.outbox_oldest_s {
            e.encode_descriptor(
                "outbox_oldest_age",
                "How long the oldest message waiting for the broker has waited (0: none waits).",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?
            .encode_gauge(&age)?;
        }
        if let Some(cpu) = self.cpu_seconds {
            e.encode_descriptor(
                "process_cpu",
                "CPU time ternd has used, user and system.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, f64>(&cpu, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_for_the_text_format() {
        let l = labels(&[("pipeline", "a\"b\\c\nd")]);
        assert_eq!(l[0].1, "a\\\"b\\\\c\\nd");
    }
}
