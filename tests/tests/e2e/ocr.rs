//! A model chain: PP-OCR's detector finds the text lines of rendered images in a watched
//! folder, its angle classifier turns upside-down crops upright, its recogniser reads them;
//! one result per image holds the whole chain, stored and sent upstream, and a kill -9 in the
//! middle of a chain leaves none of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tern_tests::mqtt::Broker;
use tern_tests::*;

use crate::feeds::start;

const T: Duration = Duration::from_secs(120);
const IMAGES: usize = 24;

/// Images rendered by `tests/models/render_text.py` with the fetch script's Python (Pillow),
/// and what is on them.
fn render(packages: &Path, out: &Path) -> Value {
    let python = std::fs::read_to_string(packages.parent().unwrap().join("python")).unwrap();
    let st = std::process::Command::new(python.trim())
        .arg(root().join("tests/models/render_text.py"))
        .arg(out)
        .args([&IMAGES.to_string(), "7"])
        .status()
        .unwrap();
    assert!(st.success());
    let truth: Value =
        serde_json::from_slice(&std::fs::read(out.join("truth.json")).unwrap()).unwrap();
    std::fs::remove_file(out.join("truth.json")).unwrap();
    truth
}

fn body(packages: &Path, inbox: &Path) -> String {
    let pkg = |n: &str| packages.join(n).display().to_string();
    format!(
        r#"[[models]]
package = "{det}"
[[models]]
package = "{cls}"
[[models]]
package = "{rec}"

[[feeds]]
kind = "directory"
name = "inbox"
path = "{inbox}"
extensions = ["png"]

[[pipelines]]
name = "ocr"
feed = "inbox"
model = "ppocr-det"
[[pipelines.stages]]
model = "ppocr-cls"
rotate = true
[[pipelines.stages]]
model = "ppocr-rec"
"#,
        det = pkg("ppocr-det"),
        cls = pkg("ppocr-cls"),
        rec = pkg("ppocr-rec"),
        inbox = inbox.display()
    )
}

/// Every stored result: its source and its boxes.
fn stored(state: &Path) -> Vec<(String, Vec<Value>)> {
    stored_outputs(state, "ocr")
        .into_iter()
        .map(|(src, outputs)| (src, boxes(&outputs)))
        .collect()
}

/// The detector's boxes in a result's outputs.
fn boxes(outputs: &Value) -> Vec<Value> {
    outputs
        .as_object()
        .unwrap()
        .values()
        .find_map(|o| o["boxes"].as_array().cloned())
        .unwrap()
}

/// Every box went through both stages, the last one with a text.
fn whole(boxes: &[Value]) -> bool {
    boxes.iter().all(|b| {
        b["stages"].as_array().is_some_and(|s| {
            s.len() == 2
                && s[1]["outputs"]
                    .as_object()
                    .and_then(|o| o.values().next())
                    .is_some_and(|o| o["text"].is_string())
        })
    })
}

fn text(b: &Value) -> String {
    b["stages"][1]["outputs"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_ocr_chain_reads_rendered_words_in_one_result_per_image() {
    let Some(packages) = third_party() else {
        return;
    };
    let Some(broker) = Broker::mosquitto().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inbox = dir.path().join("inbox");
    let truth = render(&packages, &inbox);
    let (_c, state, mut c, mut d) = start(dir.path(), "reader1", &broker, &body(&packages, &inbox));
    let sql = "SELECT count(*) FROM results WHERE pipeline = 'ocr'";
    wait_for("every image read", T, || {
        (count(&state, sql)? == IMAGES as i64).then_some(())
    })
    .unwrap();

    let (mut read, mut words, mut unboxed, mut turned) = (0, 0, Vec::new(), 0);
    let mut batched = 0;
    for (src, boxes) in stored(&state) {
        assert!(whole(&boxes), "{src}: {boxes:?}");
        let t = &truth[&src];
        let mut got: HashMap<String, usize> = HashMap::new();
        // Both stages' models name their batch: an image's crops (at most 8) run together.
        let together = |b: &Value, stage: usize| b["stages"][stage]["batch"].as_u64();
        for b in &boxes {
            for stage in [0, 1] {
                let got = together(b, stage);
                match boxes.len() {
                    1 => assert_eq!(got, None, "{src}: stage {stage} of {b}"),
                    n @ 2..=8 => assert_eq!(got, Some(n as u64), "{src}: stage {stage} of {b}"),
                    // Over 8 crops run in jobs of 8 and the rest (which may be one alone).
                    _ => {}
                }
            }
            batched += usize::from(together(b, 1).is_some());
            for w in text(b).split_whitespace() {
                *got.entry(w.to_string()).or_default() += 1;
            }
            turned += usize::from(b["stages"][0]["turned"] == 180);
        }
        for w in t["words"].as_array().unwrap() {
            words += 1;
            if let Some(n) = got.get_mut(w["text"].as_str().unwrap()).filter(|n| **n > 0) {
                *n -= 1;
                read += 1;
            }
            let r: Vec<f64> = w["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let overlaps = boxes.iter().any(|b| {
                let f = |k: &str| b[k].as_f64().unwrap();
                f("x0") < r[2] && f("x1") > r[0] && f("y0") < r[3] && f("y1") > r[1]
            });
            if !overlaps {
                unboxed.push(format!("{src}: {w}"));
            }
        }
    }
    eprintln!(
        "ocr chain: {read}/{words} words read exactly, {turned} crops turned upright, \
         {batched} read in a batch"
    );
    assert!(batched > 0, "no image had two lines");
    assert!(words > 100, "{words}");
    assert!(
        read * 100 >= words * 95,
        "{read}/{words} words read exactly"
    );
    assert!(unboxed.is_empty(), "words in no box: {unboxed:?}");
    let flipped = truth
        .as_object()
        .unwrap()
        .values()
        .filter(|t| t["flipped"] == true)
        .count();
    assert!(
        flipped > 0 && turned >= flipped,
        "{turned} turned, {flipped} images flipped"
    );

    // The same one result per image went upstream, chain and all.
    let topic = "tern/reader1/results/ocr";
    let mut upstream = std::collections::HashSet::new();
    while upstream.len() < IMAGES {
        let m = c
            .recv_match("the chain's results", T, |m| m.topic == topic)
            .unwrap();
        let v = m.json();
        assert!(whole(&boxes(&v["outputs"])), "{v}");
        upstream.insert(v["source"].as_str().unwrap().to_string());
    }
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
}

/// A kill -9 after the first crop of a chain: nothing of that image is stored; after a
/// restart every image has one whole result.
#[test]
fn a_kill_in_the_middle_of_a_chain_leaves_no_half_result() {
    let Some(packages) = third_party() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inbox: PathBuf = dir.path().join("inbox");
    render(&packages, &inbox);
    // Three images are enough here.
    for e in std::fs::read_dir(&inbox).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_str().unwrap() >= "003.png" {
            std::fs::remove_file(p).unwrap();
        }
    }
    let config = dir.path().join("ternd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"state\"\n[dbus]\nbus = \"none\"\n{}",
            body(&packages, &inbox)
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::spawn(&config, None, &[("TERN_CRASH_AT", "chain:stage")]).unwrap();
    let status = d.wait(T).unwrap();
    assert!(!status.success(), "aborted at the crash point");
    assert!(
        d.stderr().contains("TERN_CRASH_AT=chain:stage"),
        "{}",
        d.stderr()
    );
    let sql = "SELECT count(*) FROM results WHERE pipeline = 'ocr'";
    assert_eq!(count(&state, sql), Some(0), "nothing of the cut chain");

    let mut d = Daemon::spawn(&config, None, &[]).unwrap();
    wait_for("every image read once", T, || {
        (count(&state, sql)? == 3).then_some(())
    })
    .unwrap();
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let rows = stored(&state);
    let sources: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(sources.len(), 3, "{sources:?}");
    for (src, boxes) in &rows {
        assert!(!boxes.is_empty() && whole(boxes), "{src}: {boxes:?}");
    }
}

/// The OCR demo as shipped, laid out like the repository: the fetch script's page image
/// dropped in its inbox is read line by line.
#[test]
fn the_ocr_demo_runs_as_shipped() {
    let Some(packages) = third_party() else {
        return;
    };
    let (dir, config) = crate::sound::demo_as_shipped("ocr-demo", &packages);
    let cache = packages.parent().unwrap();
    let inbox = dir.path().join("var/ocr-demo/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::copy(cache.join("testdata/page.png"), inbox.join("page.png")).unwrap();
    let (st, out, err) = ternd(&["check-config", "--config", config.to_str().unwrap()]).unwrap();
    assert!(st.success(), "{out}{err}");
    let state = dir.path().join("var/ocr-demo");
    let mut d = Daemon::spawn(&config, None, &[]).unwrap();
    let sql = "SELECT count(*) FROM results WHERE pipeline = 'ocr'";
    wait_for("the page read", T, || {
        (count(&state, sql)? == 1).then_some(())
    })
    .unwrap();
    d.signal("TERM").unwrap();
    assert!(d.wait(T).unwrap().success());
    let truth: Value =
        serde_json::from_slice(&std::fs::read(cache.join("testdata/page.json")).unwrap()).unwrap();
    let lines = truth["lines"].as_array().unwrap();
    let (_, boxes) = stored(&state).pop().unwrap();
    assert!(whole(&boxes), "{boxes:?}");
    assert_eq!(boxes.len(), lines.len(), "{boxes:?}");
    // Each line of the page is found where it is, and read as something.
    for l in lines {
        let r: Vec<f64> = l
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let hit = boxes.iter().find(|b| {
            let f = |k: &str| b[k].as_f64().unwrap();
            f("x0") < r[2] && f("x1") > r[0] && f("y0") < r[3] && f("y1") > r[1]
        });
        let hit = hit.unwrap_or_else(|| panic!("line {r:?} in {boxes:?}"));
        assert!(!text(hit).trim().is_empty(), "{hit}");
    }
}
