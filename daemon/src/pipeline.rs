//! Binds a feed to a model and to sinks (the results table and the log).
//!
//! ```text
//!  feed task ──Sample (bounded, back-pressure)──► pipeline task ──► model pool
//!                                                      │
//!                                                      └─► one transaction: result + "file done"
//! ```
//!
//! Stopping: the feed stops on cancellation and drops its sender; the pipeline finishes the
//! samples already queued and ends, so a SIGTERM drains instead of dropping work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{FeedConfig, PipelineConfig};
use crate::control::LocalEvent;
use crate::engine::{EngineError, ModelPool, Prediction};
use crate::feeds::Sample;
use crate::feeds::directory::{DirectoryFeed, Outcome};
use crate::outbox::{Class, Outbox};
use crate::store::Store;

/// Samples waiting between a feed and its pipeline.
const SAMPLE_QUEUE: usize = 8;
const FEED_RETRY_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const FEED_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub results: AtomicU64,
    pub errors: AtomicU64,
}

/// A running pipeline: its two tasks and its counters.
pub struct Running {
    pub name: String,
    pub feed: String,
    pub model: String,
    pub stats: Arc<PipelineStats>,
    pub cancel: CancellationToken,
    pub feed_task: JoinHandle<()>,
    pub task: JoinHandle<()>,
}

/// Start a pipeline: its feed and the task that runs the model on each sample.
pub fn spawn(
    cfg: &PipelineConfig,
    feed: &FeedConfig,
    pool: ModelPool,
    store: Store,
    outbox: Option<Outbox>,
    local: Option<broadcast::Sender<LocalEvent>>,
    cancel: CancellationToken,
) -> Running {
    let (tx, rx) = mpsc::channel(SAMPLE_QUEUE);
    let stats = Arc::new(PipelineStats::default());
    let feed_task = match feed {
        FeedConfig::Directory {
            path,
            extensions,
            max_file_bytes,
            on_done,
            ..
        } => {
            let dir = DirectoryFeed {
                pipeline: cfg.name.clone(),
                path: path.clone(),
                extensions: extensions.clone(),
                max_file_bytes: *max_file_bytes,
                on_done: *on_done,
            };
            let (store, cancel, name) = (store.clone(), cancel.clone(), cfg.name.clone());
            tokio::spawn(async move {
                // A feed that fails (directory removed, watch limit reached) is retried with
                // back-off; only cancellation or a closed pipeline ends it.
                let mut delay = FEED_RETRY_MIN;
                loop {
                    match dir
                        .clone()
                        .run(store.clone(), tx.clone(), cancel.clone())
                        .await
                    {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(pipeline = %name, error = %e, retry_in = ?delay, "feed failed")
                        }
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(FEED_RETRY_MAX);
                }
            })
        }
    };
    let task = tokio::spawn(serve(
        cfg.name.clone(),
        pool,
        store,
        outbox,
        local,
        rx,
        stats.clone(),
    ));
    Running {
        name: cfg.name.clone(),
        feed: cfg.feed.clone(),
        model: cfg.model.clone(),
        stats,
        cancel,
        feed_task,
        task,
    }
}

async fn serve(
    name: String,
    pool: ModelPool,
    store: Store,
    outbox: Option<Outbox>,
    local: Option<broadcast::Sender<LocalEvent>>,
    mut rx: mpsc::Receiver<Sample>,
    stats: Arc<PipelineStats>,
) {
    while let Some(sample) = rx.recv().await {
        let result = match sample.input {
            Ok(input) => {
                if let Some(d) = sample.done.clone() {
                    let begun = store.call(move |c| Ok(d.begin(c)?)).await;
                    if let Err(e) = begun {
                        tracing::error!(pipeline = %name, source = %sample.source, error = %e, "attempt not recorded; sample left for later");
                        continue;
                    }
                }
                crate::crash_point("infer:begun");
                pool.infer_waiting(input).await
            }
            Err(e) => Err(e),
        };
        let done = sample.done.clone();
        let outcome = match &result {
            Ok(pred) => {
                tracing::info!(
                    pipeline = %name,
                    source = %sample.source,
                    model = %pred.model,
                    version = %pred.version,
                    label = %pred.top.first().map(|c| c.label.as_str()).unwrap_or("-"),
                    score = pred.top.first().map(|c| c.score).unwrap_or(f32::NAN),
                    latency_us = pred.latency_us,
                    "result"
                );
                stats.results.fetch_add(1, Ordering::Relaxed);
                Some(pred.clone())
            }
            // The input itself is bad (not an image, wrong shape, too large): it will not get
            // better, so it is recorded as done, but kept on disk for someone to look at.
            Err(e @ EngineError::Input { .. }) => {
                tracing::warn!(pipeline = %name, source = %sample.source, error = %e, "sample refused; left in place");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
            // The engine failed or is stopping: leave the sample undone so that it is tried
            // again after a restart, never lost.
            Err(e) => {
                tracing::error!(pipeline = %name, source = %sample.source, error = %e, "sample not processed");
                stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let delete_ok = outcome.is_some();
        let (pname, source, ts) = (name.clone(), sample.source.clone(), sample.ts_ms);
        let record = done.clone();
        let ob = outbox.clone();
        let published = outcome.is_some() && outbox.is_some();
        let signal = local.as_ref().filter(|l| l.receiver_count() > 0).is_some();
        let stored = store
            .call(move |c| {
                let tx = c.transaction()?;
                let mut said = None;
                if let Some(pred) = outcome {
                    let id = insert_result(&tx, &pname, &source, ts, &pred)?;
                    let body = serde_json::json!({
                        "id": id,
                        "pipeline": pname,
                        "source": source,
                        "ts_ms": ts,
                        "model": pred.model,
                        "version": pred.version,
                        "top": pred.top,
                        "latency_us": pred.latency_us,
                    });
                    if signal {
                        said = Some(body.to_string());
                    }
                    // The result and its upstream message commit together: a result is never
                    // stored without being on its way to the fleet, nor sent without being stored.
                    if let Some(ob) = &ob {
                        let topic = format!("{}/results/{pname}", ob.base);
                        ob.enqueue(
                            &tx,
                            &format!("results/{pname}"),
                            Class::Result,
                            &topic,
                            body,
                        )?;
                    }
                }
                if let Some(d) = &record {
                    d.record(
                        &tx,
                        if delete_ok {
                            Outcome::Result
                        } else {
                            Outcome::Refused
                        },
                    )?;
                }
                tx.commit()?;
                Ok(said)
            })
            .await;
        crate::crash_point("result:committed");
        match stored {
            Ok(said) => {
                if let (Some(l), Some(json)) = (&local, said) {
                    let _ = l.send(LocalEvent::Result {
                        pipeline: name.clone(),
                        json,
                    });
                }
                if let Some(ob) = outbox.as_ref().filter(|_| published) {
                    ob.wake();
                }
                if let Some(d) = done.filter(|_| delete_ok) {
                    d.finish();
                }
            }
            Err(e) => tracing::error!(pipeline = %name, error = %e, "result not stored"),
        }
    }
}

fn insert_result(
    tx: &rusqlite::Transaction<'_>,
    pipeline: &str,
    source: &str,
    ts_ms: i64,
    p: &Prediction,
) -> rusqlite::Result<i64> {
    let top = serde_json::to_string(&p.top).expect("classes serialise");
    let first = p.top.first();
    tx.execute(
        "INSERT INTO results (ts_ms, pipeline, source, model, version, label, score, top, latency_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        rusqlite::params![
            ts_ms,
            pipeline,
            source,
            p.model,
            p.version,
            first.map(|c| c.label.clone()),
            first.map(|c| c.score as f64),
            top,
            p.latency_us as i64
        ],
    )?;
    Ok(tx.last_insert_rowid())
}
