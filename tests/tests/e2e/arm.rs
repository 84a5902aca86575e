//! The aarch64 build under qemu-user. ARM boxes are where tern runs most; `.ci/run` builds
//! this binary (no LTO: the debug profile, dependencies optimised) so an ARM build that
//! breaks, or a tract kernel that answers differently there, fails CI. qemu shows what runs
//! and what it answers, not how fast: which plan won is recorded, not its speed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tern_tests::*;

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
const SYSROOT: &str = "/usr/aarch64-linux-gnu";

/// The first golden input of a package: `golden/0-input.npy` (format 1) or `golden/0.npz`.
fn golden_input(pkg: &Path) -> PathBuf {
    ["golden/0-input.npy", "golden/0.npz"]
        .iter()
        .map(|g| pkg.join(g))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{}: no golden input", pkg.display()))
}

/// The package's self-test tolerance (`tolerance = …` in its manifest).
fn tolerance(pkg: &Path) -> f64 {
    std::fs::read_to_string(pkg.join("tern-model.toml"))
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("tolerance = "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1e-4)
}

fn prediction(out: &std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

#[test]
fn aarch64_ternd_passes_every_golden_vector_and_answers_as_the_host() {
    let Some(arm) = cross_bin(TRIPLE, "ternd") else {
        return;
    };
    if !need("qemu-aarch64") {
        return;
    }
    assert!(
        Path::new(SYSROOT).join("lib").is_dir(),
        "{SYSROOT}: the aarch64 C library is missing (apt-get install libc6-dev-arm64-cross)"
    );
    let mut pkgs: Vec<PathBuf> = std::fs::read_dir(root().join("firmware-updates/models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("tern-model.toml").is_file())
        .collect();
    pkgs.sort();
    assert!(pkgs.len() >= 8, "{pkgs:?}");
    // The third-party models too: other exporters' graphs, state, named dimensions.
    if let Some(dir) = third_party() {
        for p in [
            "ppocr-det",
            "ppocr-cls",
            "ppocr-cls-int8",
            "ppocr-rec",
            "silero-vad",
        ] {
            pkgs.push(dir.join(p));
        }
    }
    let mut plans = Vec::new();
    for pkg in &pkgs {
        let name = pkg.file_name().unwrap().to_string_lossy().to_string();
        let input = golden_input(pkg);
        // A broken fixture must be refused alike. onnxruntime runs some of them right (they
        // break tract's reading, not the model), so both sides plan them with tract alone.
        let broken = name.ends_with("-broken");
        // PP-OCR's detector and recogniser take seconds a run under qemu: one plan, untimed.
        let heavy = name == "ppocr-det" || name == "ppocr-rec";
        let args = |plan: &str| {
            [
                "infer",
                "--model",
                pkg.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--json",
                "--plan",
                plan,
            ]
            .map(str::to_string)
        };
        let plan = if broken || heavy { "tract" } else { "auto" };
        // Loading self-tests the golden vectors under qemu: a load that succeeds passed them.
        // The host's onnxruntime library is x86: the ARM build must do without it.
        let on_arm = Command::new("qemu-aarch64")
            .arg("-L")
            .arg(SYSROOT)
            .arg(&arm)
            .args(args(plan))
            .env_remove("ORT_DYLIB_PATH")
            .output()
            .unwrap();
        // The host runs the plan aarch64 chose: two plans may each be within the tolerance of
        // the goldens and twice that apart.
        let chosen = serde_json::from_slice::<Value>(
            on_arm
                .stdout
                .split(|b| *b == b'\n')
                .next()
                .unwrap_or_default(),
        )
        .ok()
        .and_then(|v| v["plan"].as_str().map(str::to_string))
        .unwrap_or_else(|| plan.to_string());
        let host = Command::new(bin("ternd"))
            .args(args(&chosen))
            .output()
            .unwrap();
        if broken {
            assert!(!host.status.success(), "{name}: the host served it");
            assert_eq!(
                host.status.code(),
                on_arm.status.code(),
                "{name}: refused differently: host {}\naarch64 {}",
                String::from_utf8_lossy(&host.stderr),
                String::from_utf8_lossy(&on_arm.stderr)
            );
            plans.push(format!("{name}: refused"));
            continue;
        }
        let host = prediction(&host, &format!("{name} on the host"));
        let got = prediction(&on_arm, &format!("{name} on aarch64"));
        let plan = got["plan"].as_str().unwrap_or_default().to_string();
        assert!(plan.starts_with("tract"), "{name}: plan {got}");
        let tol = tolerance(pkg);
        let (want_top, got_top) = (&host["top"], &got["top"]);
        if let (Some(w), Some(g)) = (want_top[0].as_object(), got_top[0].as_object()) {
            assert_eq!(w["label"], g["label"], "{name}: host {host}\naarch64 {got}");
            let d = (w["score"].as_f64().unwrap() - g["score"].as_f64().unwrap()).abs();
            assert!(
                d <= tol,
                "{name}: top score differs by {d} (tolerance {tol})"
            );
        } else {
            assert_eq!(want_top, got_top, "{name}");
        }
        let keys = |v: &Value| -> Vec<String> {
            v["outputs"]
                .as_object()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(keys(&host), keys(&got), "{name}");
        for (k, w) in host["outputs"].as_object().into_iter().flatten() {
            if let Some(boxes) = w["boxes"].as_array() {
                let n = got["outputs"][k]["boxes"].as_array().map_or(0, Vec::len);
                assert_eq!(boxes.len(), n, "{name}: {k}: host {host}\naarch64 {got}");
            }
        }
        plans.push(format!("{name}: {plan}"));
    }
    eprintln!("aarch64 under qemu, plans chosen: {}", plans.join(", "));
}
