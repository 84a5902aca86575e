//! Drift: how far a pipeline's recent answers have moved from a baseline.
//!
//! Each result is read as its top-1 label and confidence (a detector's: its best box; no box
//! is the label `none`). The last `window` readings are kept as two histograms, confidence
//! in ten bins and the mix of labels, and compared with the baseline's by the population
//! stability index (PSI, Σ (a − e) · ln(a / e) over the bins' shares). The drift score is
//! the larger of the two. PSI is the credit-scoring industry's shift measure: under 0.1 is
//! read as no shift, 0.1 to 0.25 as a moderate one, over 0.25 as a significant one.
//!
//! The baseline is the model version's evaluation set when its package carries one (run
//! once, recorded), else the first `window` results of that version on this pipeline
//! (recorded once complete). Both survive restarts; the window does not, and fills again.

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
    pub labels: BTreeMap<String, u64>,
    /// Readings counted.
    pub n: u64,
}

fn bin(c: f32) -> Option<usize> {
    // A NaN says nothing of confidence; outside [0, 1] (logits) is clamped to the ends.
    (!c.is_nan()).then(|| ((c.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1))
}

impl Histogram {
    fn label_key<'a>(&self, label: &'a str) -> &'a str {
        if self.labels.contains_key(label) || self.labels.len() < MAX_LABELS {
            label
        } else {
            "other"
        }
    }

    pub fn add(&mut self, r: &Reading) {
        if let Some(b) = r.confidence.and_then(bin) {
            self.confidence[b] += 1;
        }
        let key = self.label_key(&r.label).to_string();
        *self.labels.entry(key).or_default() += 1;
        self.n += 1;
    }

    fn remove(&mut self, r: &Reading) {
        if let Some(b) = r.confidence.and_then(bin) {
            self.confidence[b] = self.confidence[b].saturating_sub(1);
        }
        // Folded into `other` when it was added if it is not kept by name now.
        let key = if self.labels.contains_key(&r.label) {
            r.label.clone()
        } else {
            "other".to_string()
        };
        if let Some(n) = self.labels.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.labels.remove(&key);
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
}

/// PSI between two sets of counts over the same bins, each share smoothed by half a count
/// (an empty bin on one side would otherwise make it infinite).
fn psi(actual: &[u64], expected: &[u64]) -> f64 {
    let k = actual.len() as f64;
    let (na, ne) = (
        actual.iter().sum::<u64>() as f64,
        expected.iter().sum::<u64>() as f64,
    );
    if na == 0.0 || ne == 0.0 {
        return 0.0;
    }
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            let a = (*a as f64 + 0.5) / (na + 0.5 * k);
            let e = (*e as f64 + 0.5) / (ne + 0.5 * k);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// The drift of `now` from `base`: PSI of confidence, PSI of labels.
pub fn compare(now: &Histogram, base: &Histogram) -> (f64, f64) {
    let confidence = psi(&now.confidence, &base.confidence);
    let mut keys: Vec<&String> = now.labels.keys().chain(base.labels.keys()).collect();
    keys.sort();
    keys.dedup();
    let count = |h: &Histogram| -> Vec<u64> {
        keys.iter()
            .map(|k| h.labels.get(*k).copied().unwrap_or(0))
            .collect()
    };
    (confidence, psi(&count(now), &count(base)))
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
    /// The first results made a baseline: record it.
    Learned(Baseline),
    /// The score crossed the threshold.
    Detected(Value),
    /// The score fell back under the clear level.
    Cleared(Value),
}

/// One pipeline's drift tracker.
#[derive(Debug)]
pub struct Drift {
    cfg: DriftConfig,
    /// The model version being watched, with its baseline once there is one.
    model: Option<(String, String)>,
    baseline: Option<Baseline>,
    /// A first-results baseline being learned.
    learning: Histogram,
    window: VecDeque<Reading>,
    now: Histogram,
    drifting: bool,
    last: Option<(f64, f64)>,
}

impl Drift {
    pub fn new(cfg: DriftConfig) -> Drift {
        Drift {
            cfg,
            model: None,
            baseline: None,
            learning: Histogram::default(),
            window: VecDeque::with_capacity(cfg.window),
            now: Histogram::default(),
            drifting: false,
            last: None,
        }
    }

    pub fn config(&self) -> &DriftConfig {
        &self.cfg
    }

    /// The model version being watched.
    pub fn watching(&self) -> Option<(&str, &str)> {
        self.model.as_ref().map(|(m, v)| (m.as_str(), v.as_str()))
    }

    /// Watch `model` `version` from now on, against `baseline` (recorded, or from its
    /// package), or learning one from its first results. The window starts empty: answers
    /// of another version say nothing of this one.
    pub fn watch(&mut self, model: &str, version: &str, baseline: Option<Baseline>) {
        self.model = Some((model.to_string(), version.to_string()));
        self.baseline = baseline;
        self.learning = Histogram::default();
        self.window.clear();
        self.now = Histogram::default();
        self.drifting = false;
        self.last = None;
    }

    pub fn drifting(&self) -> bool {
        self.drifting
    }

    /// Whether samples must be kept now, to be captured if their confidence is low.
    pub fn capturing(&self) -> Option<f32> {
        self.cfg.capture_below.filter(|_| self.drifting)
    }

    /// Count one reading; what it changed, if anything.
    pub fn observe(&mut self, r: Reading) -> Option<Change> {
        let (model, version) = self.model.clone()?;
        let Some(base) = &self.baseline else {
            self.learning.add(&r);
            if self.learning.n as usize >= self.cfg.window {
                let b = Baseline {
                    model,
                    version,
                    source: Source::FirstResults,
                    histogram: std::mem::take(&mut self.learning),
                };
                self.baseline = Some(b.clone());
                return Some(Change::Learned(b));
            }
            return None;
        };
        self.now.add(&r);
        self.window.push_back(r);
        if self.window.len() > self.cfg.window
            && let Some(old) = self.window.pop_front()
        {
            self.now.remove(&old);
        }
        if self.window.len() < self.cfg.window {
            return None;
        }
        let (c, l) = compare(&self.now, &base.histogram);
        self.last = Some((c, l));
        let score = c.max(l);
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
        json!({
            "model": model,
            "version": version,
            "score": self.last.map(|(c, l)| round(c.max(l))),
            "psi_confidence": self.last.map(|(c, _)| round(c)),
            "psi_labels": self.last.map(|(_, l)| round(l)),
            "threshold": self.cfg.threshold,
            "drifting": self.drifting,
            "baseline": self.baseline.as_ref().map(|b| b.source.as_str()),
            "baseline_results": self.baseline.as_ref().map(|b| b.histogram.n),
            "learning": self.baseline.is_none().then_some(self.learning.n),
            "window": self.cfg.window,
            "in_window": self.window.len(),
            "confidence": self.now.confidence_shares().iter().map(|s| round(*s)).collect::<Vec<_>>(),
            "labels": top.iter().take(10).map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        })
    }

    /// The score now, if the window is full.
    pub fn score(&self) -> Option<f64> {
        self.last.map(|(c, l)| c.max(l))
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
        assert!(psi(&[10, 20, 30, 40], &base).abs() < 1e-12);
        assert!(
            psi(&[20, 40, 60, 80], &base).abs() < 1e-3,
            "scale does not matter (beyond the half-count smoothing)"
        );
        let small = psi(&[12, 20, 30, 38], &base);
        let large = psi(&[40, 30, 20, 10], &base);
        assert!(
            0.0 < small && small < 0.1 && large > 0.25,
            "{small} {large}"
        );
        assert!(psi(&[0, 0, 0, 100], &[100, 0, 0, 0]).is_finite());
    }

    #[test]
    fn a_learned_baseline_then_a_shift_is_detected_and_cleared_once() {
        let mut d = Drift::new(cfg(20));
        assert_eq!(d.observe(r("7", 0.95)), None, "nothing watched yet");
        d.watch("m", "1.0.0", None);
        let digits = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
        let mut learned = None;
        for i in 0..20 {
            learned = d.observe(r(digits[i % 10], 0.9 + (i % 5) as f32 * 0.02));
        }
        let Some(Change::Learned(b)) = learned else {
            panic!("{learned:?}")
        };
        assert_eq!((b.source, b.histogram.n), (Source::FirstResults, 20));
        // The same mix again: a full window and no drift.
        for i in 0..20 {
            assert_eq!(
                d.observe(r(digits[i % 10], 0.9 + (i % 5) as f32 * 0.02)),
                None
            );
        }
        assert!(d.score().unwrap() < 0.1, "{}", d.report());
        assert_eq!(d.capturing(), None);
        // Inverted images: one label, unsure.
        let mut detected = Vec::new();
        for i in 0..20 {
            if let Some(c) = d.observe(r("8", 0.4)) {
                detected.push((i, c));
            }
        }
        assert_eq!(detected.len(), 1, "{detected:?}");
        let (at, Change::Detected(rep)) = &detected[0] else {
            panic!("{detected:?}")
        };
        assert!(*at < 20, "within the window");
        assert_eq!(rep["baseline"], "first_results");
        assert!(rep["score"].as_f64().unwrap() >= 0.25, "{rep}");
        assert_eq!(d.capturing(), Some(0.9));
        // Back to the baseline's mix: cleared once the window has moved on.
        let mut cleared = 0;
        for i in 0..40 {
            if let Some(Change::Cleared(_)) =
                d.observe(r(digits[i % 10], 0.9 + (i % 5) as f32 * 0.02))
            {
                cleared += 1;
            }
        }
        assert_eq!(cleared, 1);
        assert!(!d.drifting());
        // Another version starts over, learning again.
        d.watch("m", "1.1.0", None);
        assert_eq!(d.report()["learning"], 0);
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

    #[test]
    fn labels_past_the_limit_are_other() {
        let mut h = Histogram::default();
        for i in 0..MAX_LABELS + 5 {
            h.add(&r(&i.to_string(), 0.5));
        }
        assert_eq!(h.labels.len(), MAX_LABELS + 1);
        assert_eq!(h.labels["other"], 5);
        assert_eq!(h.confidence[5], (MAX_LABELS + 5) as u64);
    }
}
