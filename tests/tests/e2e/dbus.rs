//! The local API on a real dbus-daemon, started by the test with a system-type configuration
//! that includes `configs/io.tern.Daemon1.conf`, driven with `busctl` as root and as `nobody`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tern_tests::dbus::{Bus, system_bus};
use tern_tests::*;

const T: Duration = Duration::from_secs(60);

fn busctl(bus: &Bus, as_nobody: bool, args: &[&str]) -> Output {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "busctl"]);
        c
    } else {
        Command::new("busctl")
    };
    cmd.arg(format!("--address={}", bus.address))
        .args(["--json=short"])
        .args(args)
        .output()
        .unwrap()
}

fn call(bus: &Bus, as_nobody: bool, method: &str, sig_args: &[&str]) -> Output {
    let mut a = vec![
        "call",
        "io.tern.Daemon1",
        "/io/tern/Daemon1",
        "io.tern.Daemon1",
        method,
    ];
    a.extend_from_slice(sig_args);
    busctl(bus, as_nobody, &a)
}

/// The JSON document a method returned (busctl wraps it as `{"type":"s","data":["..."]}`).
fn reply(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    serde_json::from_str(v["data"][0].as_str().unwrap()).unwrap()
}

fn error_of(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "expected an error: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn config(dir: &Path, address: &str) -> PathBuf {
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let p = dir.join("ternd.toml");
    std::fs::write(
        &p,
        format!(
            "state_dir = \"state\"\n[[models]]\npackage = \"{}\"\n[[feeds]]\nkind = \"directory\"\nname = \"inbox\"\npath = \"inbox\"\n[[pipelines]]\nname = \"digits\"\nfeed = \"inbox\"\nmodel = \"digits-mlp-int8\"\n[dbus]\nbus = \"{address}\"\n",
            package("digits-mlp-int8").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn local_api_on_a_system_bus_with_the_policy() {
    let Some(bus) = system_bus() else { return };
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), &bus.address);
    let _daemon = Daemon::spawn(&cfg, None, &[]).unwrap();
    wait_for("io.tern.Daemon1 on the bus", T, || {
        call(&bus, false, "Status", &[])
            .status
            .success()
            .then_some(())
    })
    .unwrap();

    let status = reply(&call(&bus, false, "Status", &[]));
    assert!(
        status["status"].as_str().unwrap().starts_with("ready"),
        "{status}"
    );
    assert_eq!(status["models"][0]["name"], "digits-mlp-int8");
    // Every plan auto timed, the one serving among them.
    let tried = status["models"][0]["plans_tried"].as_array().unwrap();
    let plan = status["models"][0]["plan"].as_str().unwrap();
    assert!(tried.len() >= 2, "{status}");
    assert!(
        tried
            .iter()
            .any(|t| t.as_str().unwrap().starts_with(&format!("{plan}: "))),
        "{status}"
    );
    // The install timed the plans as it verified the package; activation took its choice.
    assert_eq!(status["models"][0]["plan_chosen"], "recorded", "{status}");
    // The listing shows the choice recorded for the active version's package.
    let models = reply(&call(&bus, false, "ListModels", &[]));
    assert!(models.to_string().contains("\"1.0.0\""), "{models}");
    let active = models
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == "active")
        .unwrap();
    assert_eq!(active["plan"], plan, "{models}");
    assert_eq!(active["plans_tried"], status["models"][0]["plans_tried"]);
    let pipelines = reply(&call(&bus, false, "ListPipelines", &[]));
    assert_eq!(pipelines[0]["name"], "digits", "{pipelines}");

    // An image as bytes: busctl takes `ay N b1 b2 ...`.
    let png = std::fs::read(root().join("configs/demo/inbox/digit-3.png")).unwrap();
    let mut args: Vec<String> = vec![
        "say".into(),
        "digits-mlp-int8".into(),
        png.len().to_string(),
    ];
    args.extend(png.iter().map(|b| b.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let pred = reply(&call(&bus, false, "Infer", &argv));
    assert_eq!(pred["top"][0]["label"], "3", "{pred}");

    // Named errors, the same codes as over MQTT.
    let e = error_of(&call(
        &bus,
        false,
        "Activate",
        &["ss", "digits-mlp-int8", "9.9.9"],
    ));
    assert!(e.contains("not installed"), "{e}");
    let e = error_of(&call(&bus, false, "Rollback", &["s", "digits-mlp-int8"]));
    assert!(e.contains("no previous version"), "{e}");
    let e = error_of(&call(
        &bus,
        false,
        "Infer",
        &["say", "no-such-model", "1", "0"],
    ));
    assert!(e.contains("no-such-model"), "{e}");

    let o = busctl(
        &bus,
        false,
        &[
            "get-property",
            "io.tern.Daemon1",
            "/io/tern/Daemon1",
            "io.tern.Daemon1",
            "ActiveModels",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["data"]["digits-mlp-int8"], "1.0.0", "{v}");

    // Signals, received by a plain client: a result stored by the pipeline, an activation.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (result, activated) = rt.block_on(async {
        use futures_util::StreamExt as _;
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let proxy = zbus::Proxy::new(
            &conn,
            "io.tern.Daemon1",
            "/io/tern/Daemon1",
            "io.tern.Daemon1",
        )
        .await
        .unwrap();
        let mut results = proxy.receive_signal("ResultReady").await.unwrap();
        let mut activations = proxy.receive_signal("ModelActivated").await.unwrap();
        std::fs::copy(
            root().join("configs/demo/inbox/digit-7.png"),
            d.path().join("inbox/seven.png"),
        )
        .unwrap();
        let r = tokio::time::timeout(T, results.next())
            .await
            .expect("ResultReady within the deadline")
            .unwrap();
        let (pipeline, json): (String, String) = r.body().deserialize().unwrap();
        let _: serde_json::Value = proxy
            .call("Activate", &("digits-mlp-int8", "1.0.0"))
            .await
            .map(|s: String| serde_json::from_str(&s).unwrap())
            .unwrap();
        let a = tokio::time::timeout(T, activations.next())
            .await
            .expect("ModelActivated within the deadline")
            .unwrap();
        let (model, version): (String, String) = a.body().deserialize().unwrap();
        ((pipeline, json), (model, version))
    });
    assert_eq!(result.0, "digits");
    let v: serde_json::Value = serde_json::from_str(&result.1).unwrap();
    assert_eq!(
        (
            v["source"].as_str().map(|s| s.ends_with("seven.png")),
            v["top"][0]["label"].as_str()
        ),
        (Some(true), Some("7")),
        "{v}"
    );
    assert_eq!(
        activated,
        ("digits-mlp-int8".to_string(), "1.0.0".to_string())
    );

    // Someone else on the box: reads and inferences, not state changes.
    if !need("setpriv") {
        return;
    }
    let status = reply(&call(&bus, true, "Status", &[]));
    assert!(status["status"].is_string());
    let e = error_of(&call(&bus, true, "Rollback", &["s", "digits-mlp-int8"]));
    assert!(
        e.contains("Access denied") || e.contains("AccessDenied"),
        "{e}"
    );
    let e = error_of(&call(
        &bus,
        true,
        "Activate",
        &["ss", "digits-mlp-int8", "1.0.0"],
    ));
    assert!(
        e.contains("Access denied") || e.contains("AccessDenied"),
        "{e}"
    );
    let e = error_of(&call(&bus, true, "InstallBundle", &["s", "/tmp/x.bundle"]));
    assert!(
        e.contains("Access denied") || e.contains("AccessDenied"),
        "{e}"
    );
}
