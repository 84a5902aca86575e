//! Drift: how far a pipeline's recent answers have moved from a baseline.
//!
//! Each result is read as its top-1 label and confidence (a detector's: its best box; no box
//! is the label `none`). The last `window` readings are kept as two histograms, confidence
//! in ten bins and the mix of labels (the baseline's nine most frequent labels and the rest
//! together, so both have ten bins whatever the model's classes), and compared with the
//! baseline's by the population stability index (PSI, Σ (a − e) · ln(a / e) over the bins'
//! shares). Two samples of one distribution differ by chance: their PSI is about
//! (k − 1)(1/n + 1/m) for k bins and n and m readings, which is large for small samples
//! (1.125 for 24 against 12 with ten bins). Each PSI is therefore taken less that
//! expectation, and the drift score is the larger of the two: 0 means "no more than chance",
//! and the usual reading of PSI holds for what is left (over 0.25 is a significant shift).
//!
//! The baseline is the model version's evaluation set when its package carries one (run
//! once, recorded), else the first `window` results of that version on this pipeline
//! (recorded once complete). Both survive restarts, one per version; the window does not, and
//! fills again.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::Prediction;

/// Bins of top-1 confidence, each 0.1 wide.
pub const BINS: usize = 10;
/// Labels a histogram keeps apart; the rest are counted as `other` (a model with thousands
/// of classes must not make every result cost thousands of steps).
pub const MAX_LABELS: usize = 256;
/// A drifting pipeline is back once its score falls under this share of the threshold, so a
/// score hovering at the threshold does not say detected and cleared by turns.
const CLEAR_AT: f64 = 0.8;

/// `[pipelines.drift]`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftConfig {
    /// Results compared with the baseline (the latest ones), and results a learned baseline
    /// is made of.
    pub window: usize,
    /// The drift score that raises `drift.detected`.
    pub threshold: f64,
    /// While drifting, samples whose top-1 confidence is below this are captured.
    pub capture_below: Option<f32>,
}

pub const DEFAULT_WINDOW: usize = 500;
pub const DEFAULT_THRESHOLD: f64 = 0.25;

/// One result, as drift reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub label: String,
    /// None: nothing found (a detector's empty image); counted in the label mix only.
    pub confidence: Option<f32>,
}

impl Reading {
    pub fn of(p: &Prediction) -> Reading {
        if let Some(c) = p.top.first() {
            return Reading {
                label: c.label.clone(),
                confidence: Some(c.score),
            };
        }
        let best = p
            .outputs
            .values()
            .filter_map(|o| o.get("boxes").and_then(Value::as_array))
            .flatten()
            .filter_map(|b| Some((b.get("label")?.as_str()?, b.get("score")?.as_f64()?)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((label, score)) => Reading {
                label: label.to_string(),
                confidence: Some(score as f32),
            },
            None => Reading {
                label: "none".into(),
                confidence: None,
            },
        }
    }
}

/// Counts of confidence bins and labels over some readings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub confidence: [u64; BINS],
    /// By label; past MAX_LABELS labels, the rest under [`OVERFLOW`].
    pub labels: BTreeMap<String, u64>,
    /// Readings counted.
    pub n: u64,
}

/// Where labels past MAX_LABELS are counted (no model's label).
pub const OVERFLOW: &str = "\u{0}other";

fn bin(c: f32) -> Option<usize> {
    // A NaN says nothing of confidence; outside [0, 1] (logits) is clamped to the ends.
    (!c.is_nan()).then(|| ((c.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1))
}

/// Where one reading was counted, so that taking it out again is exact.
#[derive(Debug, Clone, PartialEq)]
struct Counted {
    bin: Option<usize>,
    key: String,
}

impl Histogram {
    fn add(&mut self, r: &Reading) -> Counted {
        let bin = r.confidence.and_then(bin);
        if let Some(b) = bin {
            self.confidence[b] += 1;
        }
        let key = if self.labels.contains_key(&r.label) || self.labels.len() < MAX_LABELS {
            r.label.clone()
        } else {
            OVERFLOW.to_string()
        };
        *self.labels.entry(key.clone()).or_default() += 1;
        self.n += 1;
        Counted { bin, key }
    }

    fn remove(&mut self, c: &Counted) {
        if let Some(b) = c.bin {
            self.confidence[b] = self.confidence[b].saturating_sub(1);
        }
        if let Some(n) = self.labels.get_mut(&c.key) {
            *n -= 1;
            if *n == 0 {
                self.labels.remove(&c.key);
            }
        }
        self.n = self.n.saturating_sub(1);
    }

    pub fn from_readings<'a>(rs: impl IntoIterator<Item = &'a Reading>) -> Histogram {
        let mut h = Histogram::default();
        for r in rs {
            h.add(r);
        }
        h
    }

    /// The confidence bins as shares of the readings that had one.
    pub fn confidence_shares(&self) -> Vec<f64> {
        let total: u64 = self.confidence.iter().sum();
        self.confidence
            .iter()
            .map(|c| *c as f64 / total.max(1) as f64)
            .collect()
    }

    /// The labels as ten bins: `keys` by name, everything else together.
    fn label_bins(&self, keys: &[String]) -> Vec<u64> {
        let mut bins: Vec<u64> = keys
            .iter()
            .map(|k| self.labels.get(k).copied().unwrap_or(0))
            .collect();
        bins.push(self.n - bins.iter().sum::<u64>());
        bins
    }

    /// The nine most frequent labels (ties by name): the label bins of a comparison.
    fn top_labels(&self) -> Vec<String> {
        let mut v: Vec<(&String, &u64)> =
            self.labels.iter().filter(|(k, _)| *k != OVERFLOW).collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter()
            .take(BINS - 1)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// PSI between two sets of counts over the same bins, each share smoothed by half a count
/// (an empty bin on one side would otherwise make it infinite), less what two samples of one
/// distribution differ by on average; `(raw, corrected)`.
fn psi(actual: &[u64], expected: &[u64]) -> (f64, f64) {
    let (na, ne) = (
        actual.iter().sum::<u64>() as f64,
        expected.iter().sum::<u64>() as f64,
    );
    if na == 0.0 || ne == 0.0 {
        return (0.0, 0.0);
    }
    let k = actual.len() as f64;
    let raw: f64 = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            let a = (*a as f64 + 0.5) / (na + 0.5 * k);
            let e = (*e as f64 + 0.5) / (ne + 0.5 * k);
            (a - e) * (a / e).ln()
        })
        .sum();
    // Bins neither side uses carry no chance difference.
    let used = actual
        .iter()
        .zip(expected)
        .filter(|(a, e)| **a + **e > 0)
        .count() as f64;
    let chance = (used - 1.0).max(0.0) * (1.0 / na + 1.0 / ne);
    (raw, (raw - chance).max(0.0))
}

/// The drift of `now` from `base`, labels binned by `keys`: (confidence, labels), each
/// `(raw, corrected)`.
fn compare(now: &Histogram, base: &Histogram, keys: &[String]) -> [(f64, f64); 2] {
    [
        psi(&now.confidence, &base.confidence),
        psi(&now.label_bins(keys), &base.label_bins(keys)),
    ]
}

/// Where a baseline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The package's evaluation set.
    Package,
    /// The first results of the version on this pipeline.
    FirstResults,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Package => "package",
            Source::FirstResults => "first_results",
        }
    }
}

/// A baseline for one model version on one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub model: String,
    pub version: String,
    pub source: Source,
    pub histogram: Histogram,
}

/// What one reading changed that someone must hear of.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The first results made a baseline, or the package's evaluation set did: record it.
    Learned(Baseline),
    /// The score crossed the threshold.
    Detected(Value),
    /// The score fell back under the clear level, or the version watched changed.
    Cleared(Value),
}

/// One pipeline's drift tracker.
#[derive(Debug)]
pub struct Drift {
    cfg: DriftConfig,
    /// The model version being watched, with its baseline once there is one.
    model: Option<(String, String)>,
    baseline: Option<Baseline>,
    /// The baseline's label bins.
    keys: Vec<String>,
    /// A first-results baseline being learned.
    learning: Histogram,
    window: VecDeque<Counted>,
    now: Histogram,
    drifting: bool,
    /// (confidence, labels), each (raw, corrected), once the window is full.
    last: Option<[(f64, f64); 2]>,
    /// Readings compared since the baseline.
    seen: u64,
}

impl Drift {
    pub fn new(cfg: DriftConfig) -> Drift {
        Drift {
            cfg,
            model: None,
            baseline: None,
            keys: Vec::new(),
            learning: Histogram::default(),
            window: VecDeque::with_capacity(cfg.window),
            now: Histogram::default(),
            drifting: false,
            last: None,
            seen: 0,
        }
    }

    /// The model version being watched.
    pub fn watching(&self) -> Option<(&str, &str)> {
        self.model.as_ref().map(|(m, v)| (m.as_str(), v.as_str()))
    }

    /// Watch `model` `version` from now on, against `baseline` (recorded, or from its
    /// package), or learning one from its first results. The window starts empty: answers
    /// of another version say nothing of this one. A drift of the version watched before
    /// ends here, and is said to.
    pub fn watch(
        &mut self,
        model: &str,
        version: &str,
        baseline: Option<Baseline>,
    ) -> Option<Change> {
        let ended = self.drifting.then(|| {
            let mut r = self.report();
            r["drifting"] = false.into();
            r["reason"] = format!("model {model} {version} answers now").into();
            Change::Cleared(r)
        });
        self.model = Some((model.to_string(), version.to_string()));
        self.keys = baseline
            .as_ref()
            .map(|b| b.histogram.top_labels())
            .unwrap_or_default();
        self.baseline = baseline;
        self.learning = Histogram::default();
        self.window.clear();
        self.now = Histogram::default();
        self.drifting = false;
        self.last = None;
        self.seen = 0;
        ended
    }

    pub fn drifting(&self) -> bool {
        self.drifting
    }

    /// Whether samples must be kept now, to be captured if their confidence is low.
    pub fn capturing(&self) -> Option<f32> {
        self.cfg.capture_below.filter(|_| self.drifting)
    }

    /// Count one reading of the version watched; what it changed, if anything.
    pub fn observe(&mut self, r: Reading) -> Option<Change> {
        let Some(base) = &self.baseline else {
            let (model, version) = self.model.as_ref()?;
            self.learning.add(&r);
            if self.learning.n as usize >= self.cfg.window {
                let b = Baseline {
                    model: model.clone(),
                    version: version.clone(),
                    source: Source::FirstResults,
                    histogram: std::mem::take(&mut self.learning),
                };
                self.keys = b.histogram.top_labels();
                self.baseline = Some(b.clone());
                return Some(Change::Learned(b));
            }
            return None;
        };
        self.seen += 1;
        let counted = self.now.add(&r);
        self.window.push_back(counted);
        if self.window.len() > self.cfg.window
            && let Some(old) = self.window.pop_front()
        {
            self.now.remove(&old);
        }
        if self.window.len() < self.cfg.window {
            return None;
        }
        let parts = compare(&self.now, &base.histogram, &self.keys);
        self.last = Some(parts);
        let score = parts[0].1.max(parts[1].1);
        if !self.drifting && score >= self.cfg.threshold {
            self.drifting = true;
            return Some(Change::Detected(self.report()));
        }
        if self.drifting && score < self.cfg.threshold * CLEAR_AT {
            self.drifting = false;
            return Some(Change::Cleared(self.report()));
        }
        None
    }

    /// The score and what it is made of, as events, status and telemetry say it.
    pub fn report(&self) -> Value {
        let (model, version) = self.watching().unwrap_or(("", ""));
        let mut top: Vec<(&String, &u64)> = self.now.labels.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let round = |x: f64| (x * 1e4).round() / 1e4;
        let part =
            |i: usize, raw: bool| self.last.map(|p| round(if raw { p[i].0 } else { p[i].1 }));
        let name = |k: &str| {
            if k == OVERFLOW {
                "(other labels)".to_string()
            } else {
                k.to_string()
            }
        };
        json!({
            "model": model,
            "version": version,
            "score": self.score().map(round),
            "psi_confidence": part(0, true),
            "psi_labels": part(1, true),
            "score_confidence": part(0, false),
            "score_labels": part(1, false),
            "threshold": self.cfg.threshold,
            "drifting": self.drifting,
            "baseline": self.baseline.as_ref().map(|b| b.source.as_str()),
            "baseline_results": self.baseline.as_ref().map(|b| b.histogram.n),
            "learning": self.baseline.is_none().then_some(self.learning.n),
            "window": self.cfg.window,
            "in_window": self.window.len(),
            "seen": self.seen,
            "confidence": self.now.confidence_shares().iter().map(|s| round(*s)).collect::<Vec<_>>(),
            "labels": top.iter().take(10).map(|(k, v)| json!([name(k), v])).collect::<Vec<_>>(),
        })
    }

    /// The score now, if the window is full.
    pub fn score(&self) -> Option<f64> {
        self.last.map(|p| p[0].1.max(p[1].1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(label: &str, c: f32) -> Reading {
        Reading {
            label: label.into(),
            confidence: Some(c),
        }
    }

    fn cfg(window: usize) -> DriftConfig {
        DriftConfig {
            window,
            threshold: 0.25,
            capture_below: Some(0.9),
        }
    }

    #[test]
    fn psi_is_zero_for_the_same_mix_and_grows_with_the_shift() {
        let base = [10, 20, 30, 40];
        assert!(psi(&[10, 20, 30, 40], &base).0.abs() < 1e-12);
        assert!(
            psi(&[20, 40, 60, 80], &base).0.abs() < 1e-3,
            "scale does not matter (beyond the half-count smoothing)"
        );
        let small = psi(&[12, 20, 30, 38], &base).0;
        let large = psi(&[40, 30, 20, 10], &base).0;
        assert!(
            0.0 < small && small < 0.1 && large > 0.25,
            "{small} {large}"
        );
        assert!(psi(&[0, 0, 0, 100], &[100, 0, 0, 0]).0.is_finite());
    }

    /// Samples drawn from one distribution score about 0 after the chance correction,
    /// whatever their size; the raw PSI of small samples would be a false alarm.
    #[test]
    fn chance_differences_of_small_samples_are_not_drift() {
        // A fixed pseudo-random stream over ten equally likely bins.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut draw = |n: usize| {
            let mut bins = vec![0u64; 10];
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bins[(x % 10) as usize] += 1;
            }
            bins
        };
        let mut raw_alarms = 0;
        for _ in 0..200 {
            let (a, b) = (draw(24), draw(12));
            let (raw, corrected) = psi(&a, &b);
            raw_alarms += usize::from(raw >= 0.25);
            assert!(corrected < raw || raw == 0.0);
        }
        assert!(
            raw_alarms > 150,
            "raw PSI of 24 against 12 is mostly over 0.25: {raw_alarms}"
        );
        let mut alarms = 0;
        for _ in 0..200 {
            let (a, b) = (draw(150), draw(150));
            alarms += usize::from(psi(&a, &b).1 >= 0.25);
        }
        assert_eq!(alarms, 0, "windows of 150 from one distribution");
    }

    #[test]
    fn a_learned_baseline_then_a_shift_is_detected_and_cleared_once() {
        let mut d = Drift::new(cfg(20));
        assert_eq!(d.observe(r("7", 0.95)), None, "nothing watched yet");
        assert_eq!(d.watch("m", "1.0.0", None), None);
        let digits = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
        let calm = |i: usize| r(digits[i % 10], 0.9 + (i % 5) as f32 * 0.02);
        let mut learned = None;
        for i in 0..20 {
            learned = d.observe(calm(i));
        }
        let Some(Change::Learned(b)) = learned else {
            panic!("{learned:?}")
        };
        assert_eq!((b.source, b.histogram.n), (Source::FirstResults, 20));
        // The same mix again: a full window and no drift.
        for i in 0..20 {
            assert_eq!(d.observe(calm(i)), None);
        }
        assert!(d.score().unwrap() < 0.1, "{}", d.report());
        assert_eq!(d.capturing(), None);
        // Inverted images: one label, unsure; more of them than a window.
        let mut detected = Vec::new();
        for i in 0..40 {
            if let Some(c) = d.observe(r("8", 0.4)) {
                detected.push((i, c));
            }
        }
        assert_eq!(detected.len(), 1, "{detected:?}");
        let (at, Change::Detected(rep)) = &detected[0] else {
            panic!("{detected:?}")
        };
        assert!(*at < 20, "within a window: {at}");
        assert_eq!(rep["baseline"], "first_results");
        assert_eq!(rep["seen"], 20 + *at as u64 + 1);
        assert!(rep["score"].as_f64().unwrap() >= 0.25, "{rep}");
        assert_eq!(d.capturing(), Some(0.9));
        // Back to the baseline's mix: cleared once the window has moved on.
        let mut cleared = 0;
        for i in 0..40 {
            if let Some(Change::Cleared(_)) = d.observe(calm(i)) {
                cleared += 1;
            }
        }
        assert_eq!(cleared, 1);
        assert!(!d.drifting());
        // Drifting when another version starts answering: the drift ends, said so, and the
        // new version learns its own baseline.
        for _ in 0..20 {
            d.observe(r("8", 0.4));
        }
        assert!(d.drifting());
        let Some(Change::Cleared(ended)) = d.watch("m", "1.1.0", None) else {
            panic!("no end of drift said")
        };
        assert!(
            ended["reason"].as_str().unwrap().contains("1.1.0"),
            "{ended}"
        );
        assert_eq!(d.report()["learning"], 0);
        assert_eq!(d.capturing(), None);
    }

    #[test]
    fn a_detector_reads_its_best_box_and_an_empty_image_is_none() {
        let p = |outputs: Value| Prediction {
            model: "d".into(),
            version: "1".into(),
            top: vec![],
            outputs: outputs.as_object().unwrap().clone(),
            latency_us: 0,
            batch: None,
        };
        let boxes = p(json!({"o": {"boxes": [
            {"label": "4", "score": 0.6}, {"label": "8", "score": 0.9}
        ]}}));
        assert_eq!(Reading::of(&boxes), r("8", 0.9));
        let empty = Reading::of(&p(json!({"o": {"boxes": []}})));
        assert_eq!((empty.label.as_str(), empty.confidence), ("none", None));
    }

    /// Past MAX_LABELS labels the rest share one bin, and a reading leaves the window from
    /// the bin it was counted in, so the counts stay exact.
    #[test]
    fn labels_past_the_limit_share_a_bin_and_leave_it_exactly() {
        let mut h = Histogram::default();
        let counted: Vec<Counted> = (0..MAX_LABELS + 5)
            .map(|i| h.add(&r(&i.to_string(), 0.5)))
            .collect();
        assert_eq!(h.labels.len(), MAX_LABELS + 1);
        assert_eq!(h.labels[OVERFLOW], 5);
        assert_eq!(h.confidence[5], (MAX_LABELS + 5) as u64);
        // The first label leaves; a label folded before stays folded as it leaves.
        h.remove(&counted[0]);
        h.remove(&counted[MAX_LABELS]);
        assert_eq!(h.labels[OVERFLOW], 4);
        assert!(!h.labels.contains_key("0"));
        assert_eq!(h.n, (MAX_LABELS + 3) as u64);
        assert_eq!(h.labels.values().sum::<u64>(), h.n);
        // A comparison has ten label bins whatever the classes.
        assert_eq!(h.label_bins(&h.top_labels()).len(), BINS);
    }
}
