//! io.tern.Daemon1 over a zbus peer-to-peer connection (a socket pair, no bus daemon): the
//! interface's methods, named errors, properties and signals, fast enough to run with the
//! unit tests. The bus policy and dbus-daemon itself are covered by tests/e2e/dbus.rs.

use std::path::{Path, PathBuf};

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::sync::mpsc;

use ternd::config;
use ternd::control::{Control, DaemonState};
use ternd::events::LocalEvent;
use ternd::local::client::Daemon1Proxy;
use ternd::registry::Registry;
use ternd::store::Store;

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-updates/models")
}

/// A control with digits-mlp-int8 active, as the service would build it.
async fn control(dir: &Path) -> Control {
    let cfg_path = dir.join("ternd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "state_dir = \"state\"\n[[models]]\npackage = \"{}\"\n[dbus]\nbus = \"none\"\n",
            models().join("digits-mlp-int8").display()
        ),
    )
    .unwrap();
    let cfg = config::load(&cfg_path).unwrap();
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let db = cfg.state_dir.join("tern.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .unwrap()
        .unwrap();
    let registry = Registry::spawn(store.clone(), &cfg.state_dir);
    assert!(registry.apply(&cfg.models).await.is_empty());
    let (reload, _) = mpsc::channel(1);
    Control::new(
        ternd::control::Deps {
            registry,
            store,
            outbox: None,
            events: Default::default(),
            service: reload,
            log: Box::new(|_| Ok(())),
            updater: None,
        },
        DaemonState {
            config: cfg,
            pipelines: Vec::new(),
            summary: "ready: test".into(),
        },
    )
}

/// The server side and a client proxy on the two ends of a socket pair.
async fn pair(control: Control) -> (zbus::Connection, Daemon1Proxy<'static>) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let guid = zbus::Guid::generate();
    let server = ternd::local::serve_p2p(a, guid, control);
    let client = async {
        zbus::connection::Builder::unix_stream(b)
            .p2p()
            .build()
            .await
            .unwrap()
    };
    let (server, client) = tokio::join!(server, client);
    let server = server.unwrap();
    let proxy = Daemon1Proxy::builder(&client)
        .destination("io.tern.Daemon1")
        .unwrap()
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    (server, proxy)
}

fn json(s: String) -> Value {
    serde_json::from_str(&s).unwrap()
}

fn error_name(e: zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => panic!("not a method error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_errors_properties_and_signals_peer_to_peer() {
    let d = tempfile::tempdir().unwrap();
    let control = control(d.path()).await;
    let (_server, p) = pair(control.clone()).await;

    let s = json(p.status().await.unwrap());
    assert_eq!(s["status"], "ready: test");
    assert_eq!(s["models"][0]["name"], "digits-mlp-int8");
    let m = json(p.list_models().await.unwrap());
    assert_eq!(m[0]["state"], "active", "{m}");
    assert_eq!(
        json(p.list_pipelines().await.unwrap()),
        Value::Array(vec![])
    );
    let page = json(p.query_results_after(0, 0, 10).await.unwrap());
    assert_eq!(page["results"], Value::Array(vec![]), "{page}");
    assert_eq!(json(p.query_results(0, 10).await.unwrap()), page);

    let png = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo/inbox/digit-7.png"),
    )
    .unwrap();
    let r = json(p.infer("digits-mlp-int8", &png).await.unwrap());
    assert_eq!(r["top"][0]["label"], "7", "{r}");
    let zeros = serde_json::to_string(&vec![vec![0.0f32; 64]]).unwrap();
    let r = json(p.infer_tensor("digits-mlp-int8", &zeros).await.unwrap());
    assert_eq!(r["model"], "digits-mlp-int8", "{r}");

    // Each failure is its own named error.
    for (call, want) in [
        (p.infer("nope", &png).await, "io.tern.Error.NotFound"),
        (
            p.infer("digits-mlp-int8", b"junk").await,
            "io.tern.Error.BadRequest",
        ),
        (
            p.infer_tensor("digits-mlp-int8", "\"x\"").await,
            "io.tern.Error.BadRequest",
        ),
        (
            p.infer_tensor("digits-mlp-int8", "[[1,2]]").await,
            "io.tern.Error.BadRequest",
        ),
        (
            p.activate("digits-mlp-int8", "9.9.9").await,
            "io.tern.Error.NotFound",
        ),
        (
            p.activate("digits-mlp-int8", "nine").await,
            "io.tern.Error.BadRequest",
        ),
        (
            p.rollback("digits-mlp-int8").await,
            "io.tern.Error.Conflict",
        ),
        (p.query_results(0, 0).await, "io.tern.Error.BadRequest"),
        (
            p.query_results_after(0, 0, 0).await,
            "io.tern.Error.BadRequest",
        ),
        (
            p.install_bundle("relative.bundle").await,
            "io.tern.Error.BadRequest",
        ),
    ] {
        assert_eq!(error_name(call.unwrap_err()), want);
    }
    // Updates are off (no keys): a bundle cannot be trusted, and nothing is spooled.
    assert_eq!(
        error_name(p.install_bundle("/x.bundle").await.unwrap_err()),
        "io.tern.Error.Conflict"
    );
    assert!(!d.path().join("state/spool").exists());

    assert_eq!(p.state().await.unwrap(), "ready: test");
    let active = p.active_models().await.unwrap();
    assert_eq!(
        active.get("digits-mlp-int8").map(String::as_str),
        Some("1.0.0")
    );

    // Signals: what the daemon's modules announce reaches a subscriber as typed signals.
    let mut results = p.receive_result_ready().await.unwrap();
    let mut activated = p.receive_model_activated().await.unwrap();
    let mut progress = p.receive_update_progress().await.unwrap();
    control.local(LocalEvent::Result {
        pipeline: "cam".into(),
        json: "{\"id\":1}".into(),
    });
    control.local(LocalEvent::Update {
        model: "digits-mlp-int8".into(),
        version: "1.1.0".into(),
        state: "downloading".into(),
        percent: 40,
    });
    let r = tokio::time::timeout(DEADLINE, results.next())
        .await
        .unwrap()
        .unwrap();
    let a = r.args().unwrap();
    assert_eq!(
        (a.pipeline().as_str(), a.json().as_str()),
        ("cam", "{\"id\":1}")
    );
    let u = tokio::time::timeout(DEADLINE, progress.next())
        .await
        .unwrap()
        .unwrap();
    let a = u.args().unwrap();
    assert_eq!((a.state().as_str(), *a.percent()), ("downloading", 40));
    // A real activation (same version again is allowed) announces itself.
    let r = json(p.activate("digits-mlp-int8", "1.0.0").await.unwrap());
    assert_eq!(r["active"], "1.0.0");
    let m = tokio::time::timeout(DEADLINE, activated.next())
        .await
        .unwrap()
        .unwrap();
    let a = m.args().unwrap();
    assert_eq!(
        (a.model().as_str(), a.version().as_str()),
        ("digits-mlp-int8", "1.0.0")
    );
}

/// Paging through `results.query` with `next_since` and `next_after` returns every result
/// once, even when more results than a page share one timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_pages_never_repeat_or_skip_rows_sharing_a_timestamp() {
    let d = tempfile::tempdir().unwrap();
    let control = control(d.path()).await;
    // 7 results at one instant, 3 at the next, 2 before `since`.
    let stamps: Vec<i64> = [1000; 2]
        .into_iter()
        .chain([5000; 7])
        .chain([5001; 3])
        .collect();
    let ids: Vec<i64> = control
        .store()
        .call(move |c| {
            let mut ids = Vec::new();
            for ts in stamps {
                c.execute(
                    "INSERT INTO results (ts_ms, pipeline, source, model, version, top, latency_us)
                     VALUES (?1, 'p', 's', 'm', '1.0.0', '[]', 1)",
                    [ts],
                )?;
                ids.push(c.last_insert_rowid());
            }
            Ok(ids)
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut args = serde_json::json!({"since": 5000, "limit": 3});
    loop {
        let page = control
            .dispatch("results.query", args.clone())
            .await
            .unwrap();
        let rows = page["results"].as_array().unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
        assert!(seen.len() <= ids.len(), "pages repeat rows: {seen:?}");
        args = serde_json::json!({"since": page["next_since"], "after": page["next_after"], "limit": 3});
    }
    assert_eq!(seen, ids[2..].to_vec());
}
