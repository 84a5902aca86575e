//! What the .deb packages are made of, checked without building one (cross/build.sh builds
//! and installs them): every asset exists, the default config is valid with the models it
//! ships, the maintainer scripts parse, and ternctl is ternd under another name.

use std::path::Path;

use tern_tests::*;

fn deb_metadata(package_dir: &str) -> toml::Value {
    let text = std::fs::read_to_string(root().join(package_dir).join("Cargo.toml")).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    v["package"]["metadata"]["deb"].clone()
}

#[test]
fn every_packaged_file_exists() {
    for pkg in ["daemon", "firmware-updates/cli"] {
        let deb = deb_metadata(pkg);
        let assets = deb["assets"].as_array().unwrap();
        assert!(!assets.is_empty());
        for a in assets {
            let src = a[0].as_str().unwrap();
            // Built binaries come from the build; everything else is in the repository.
            if src.starts_with("target/") {
                continue;
            }
            let path = root().join(pkg).join(src);
            let found = match src.strip_suffix("/*") {
                Some(dir) => std::fs::read_dir(root().join(pkg).join(dir))
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false),
                None => std::fs::symlink_metadata(&path).is_ok(),
            };
            assert!(found, "{pkg}: asset {src} is missing");
        }
        if let Some(scripts) = deb.get("maintainer-scripts").and_then(|s| s.as_str()) {
            for script in ["postinst", "postrm"] {
                let p = root().join(pkg).join(scripts).join(script);
                let o = std::process::Command::new("sh")
                    .arg("-n")
                    .arg(&p)
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{}: {}",
                    p.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
    }
    let link = root().join("cross/debian/ternctl");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("ternd"));
    let unit = deb_metadata("daemon")["systemd-units"]["unit-name"].clone();
    assert!(
        root()
            .join(format!("configs/{}.service", unit.as_str().unwrap()))
            .is_file()
    );
}

/// `/etc/tern/ternd.toml` as installed, with the package's paths mapped into this repository
/// and a temporary state directory: valid, with both shipped models and the inbox pipeline.
#[test]
fn the_installed_default_config_is_valid_with_the_shipped_models() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("var-lib-tern");
    std::fs::create_dir_all(state.join("inbox")).unwrap();
    let text = std::fs::read_to_string(root().join("configs/box.toml")).unwrap();
    assert!(text.contains("/usr/share/tern/models/") && text.contains("/var/lib/tern"));
    let mapped = text
        .replace(
            "/usr/share/tern/models",
            root().join("firmware-updates/models").to_str().unwrap(),
        )
        .replace("/var/lib/tern", state.to_str().unwrap());
    let cfg = d.path().join("ternd.toml");
    std::fs::write(&cfg, mapped).unwrap();
    let (status, out, err) = ternd(&["check-config", "--config", cfg.to_str().unwrap()]).unwrap();
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("OK (2 model(s), 1 feed(s), 1 pipeline(s)"),
        "{out}"
    );
    // The package installs exactly the models the default config names.
    let deb = deb_metadata("daemon");
    for m in ["digits-cnn-int8", "iris-mlp-int8"] {
        assert!(text.contains(&format!("/usr/share/tern/models/{m}\"")));
        assert!(
            deb["assets"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a[1].as_str() == Some(&format!("usr/share/tern/models/{m}/"))),
            "{m} is not packaged"
        );
    }
}

/// The GPU path compiles: `--features cuda` links tract-cuda, which needs no CUDA toolkit to
/// build (it loads the libraries at run time). There is no GPU here to run it on; the
/// fallback without one is tested in daemon/tests/engine.rs and e2e/ternctl.rs.
#[test]
fn the_cuda_feature_compiles() {
    // A type-check of another feature set, not a build of what the tests run: the binaries
    // under test are cargo's own, built before any test started.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = std::process::Command::new(cargo)
        .args([
            "check",
            "--quiet",
            "-p",
            "ternd",
            "--features",
            "cuda",
            "--lib",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
