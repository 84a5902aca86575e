//! `tern-update` as an operator runs it: keys, bundle (with tern's self-test), sign, verify,
//! inspect; a tampered or refused bundle is named for what is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tool(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern-update"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running tern-update")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn bundle_sign_verify_inspect_and_refusals() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let pubkey = |name: &str| {
        let o = tool(&["keygen", "--out", name], dir);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let (a, b) = (pubkey("a.key"), pubkey("b.key"));
    // The public key again, from the file given as an argument or with --key.
    for args in [&["pubkey", "a.key"][..], &["pubkey", "--key", "a.key"]] {
        let o = tool(args, dir);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), a, "{args:?}");
    }
    assert!(!tool(&["pubkey"], dir).status.success());
    let pkg = models().join("digits-mlp-int8");
    let pkg = pkg.to_str().unwrap();

    let o = tool(
        &[
            "bundle",
            "--package",
            pkg,
            "--out",
            "m.bundle",
            "--key",
            "a.key",
            "--group",
            "lab",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("digits-mlp-int8 1.0.0"), "{}", text(&o));

    // One signature meets a threshold of one, not of two; a second holder signs.
    let verify = |threshold: &str| {
        tool(
            &[
                "verify",
                "--trust",
                &a,
                "--trust",
                &b,
                "--threshold",
                threshold,
                "m.bundle",
            ],
            dir,
        )
    };
    let o = verify("1");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).starts_with("OK: digits-mlp-int8 1.0.0"),
        "{}",
        text(&o)
    );
    let o = verify("2");
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(
        text(&o).contains("REFUSED (below_threshold)"),
        "{}",
        text(&o)
    );
    let o = tool(&["sign", "--key", "b.key", "m.bundle"], dir);
    assert!(o.status.success(), "{}", text(&o));
    assert!(verify("2").status.success());
    let o = tool(&["sign", "--key", "b.key", "m.bundle"], dir);
    assert!(!o.status.success(), "signing twice with one key must fail");

    // An untrusted verifier refuses it.
    let o = tool(
        &["verify", "--trust", &a, "--threshold", "2", "m.bundle"],
        dir,
    );
    assert!(text(&o).contains("REFUSED (unknown_key)"), "{}", text(&o));

    // A reader that stops early (`| head -1`) is no error.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern-update"))
        .args(["inspect", "m.bundle"])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("Broken pipe"), "{}", text(&o));

    let o = tool(&["inspect", "--json", "m.bundle"], dir);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "digits-mlp-int8");
    assert_eq!(v["signatures"].as_array().unwrap().len(), 2);
    assert!(
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "model.onnx"),
        "{v}"
    );

    // A byte of the artifact flipped inside the bundle file: the chunk that holds it fails.
    let mut bytes = std::fs::read(dir.join("m.bundle")).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(dir.join("bad.bundle"), &bytes).unwrap();
    let o = tool(&["verify", "--trust", &a, "--trust", &b, "bad.bundle"], dir);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("REFUSED (bad_chunk)"), "{}", text(&o));

    // A package whose golden vectors tern's engine does not reproduce, on any plan, is never
    // bundled: a good model whose reference output was changed.
    let broken = dir.join("wrong-golden");
    copy_dir(&models().join("digits-mlp-int8"), &broken);
    let out = broken.join("golden/0-output.npy");
    let mut npy = std::fs::read(&out).unwrap();
    let last = npy.len() - 4;
    npy[last..].copy_from_slice(&0.75f32.to_le_bytes());
    std::fs::write(&out, npy).unwrap();
    let o = tool(
        &[
            "bundle",
            "--package",
            broken.to_str().unwrap(),
            "--out",
            "x.bundle",
            "--key",
            "a.key",
        ],
        dir,
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("self-test"), "{}", text(&o));
    assert!(!dir.join("x.bundle").exists());

    // A truncated model file: refused too, named.
    let trunc = dir.join("trunc");
    copy_dir(&models().join("digits-mlp-int8"), &trunc);
    let onnx = trunc.join("model.onnx");
    let len = std::fs::metadata(&onnx).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&onnx)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = tool(
        &[
            "bundle",
            "--package",
            trunc.to_str().unwrap(),
            "--out",
            "t.bundle",
        ],
        dir,
    );
    assert!(!o.status.success());
    assert!(!dir.join("t.bundle").exists());
}
