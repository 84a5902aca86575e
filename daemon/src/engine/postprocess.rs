//! What an output's values mean: each postprocessor turns one output tensor into JSON that
//! `ternd infer --json`, the results table, MQTT results and D-Bus signals all carry.
//!
//! Pure functions of the values (and, for `score`, of the previous step's state): no tract.

use serde_json::{Value, json};

use super::input::Geometry;
use super::manifest::{DetectFormat, Postprocess};
use super::model::Class;

/// Distributions one classify result may list.
const MAX_POSITIONS: usize = 65_536;

/// A postprocessor that cannot read an output of this shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit(pub String);

/// Softmax in place.
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in v.iter_mut() {
        *x /= sum;
    }
}

/// The k highest scores, labelled; NaN never wins a slot above a number.
pub fn top_k(scores: &[f32], k: usize, labels: &[String]) -> Vec<Class> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| {
        scores[*a]
            .is_nan()
            .cmp(&scores[*b].is_nan())
            .then(scores[*b].total_cmp(&scores[*a]))
            .then(a.cmp(b))
    });
    idx.truncate(k.min(scores.len()));
    idx.into_iter()
        .map(|i| Class {
            index: i,
            label: labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
            score: scores[i],
        })
        .collect()
}

/// A score output's on/off state, carried from one step of a sequence to the next.
pub type ScoreState = Option<bool>;

/// Everything a postprocessor may need besides the values.
pub struct Context<'a> {
    pub charset: Option<&'a [String]>,
    pub geometry: Option<Geometry>,
}

/// Apply one output's postprocessor. `score` reads and updates `on`.
pub fn apply(
    post: &Postprocess,
    shape: &[usize],
    mut values: Vec<f32>,
    ctx: &Context<'_>,
    on: &mut ScoreState,
) -> Result<Value, Misfit> {
    match post {
        Postprocess::Classify {
            softmax: sm,
            top_k: k,
            labels,
            axis,
        } => {
            // Without an axis, every value is one class of a single distribution.
            let flat = [values.len()];
            let (shape, axis) = match axis {
                Some(a) => (shape, *a),
                None => (&flat[..], 0),
            };
            let rank = shape.len().max(1) as i64;
            let a = if axis < 0 { rank + axis } else { axis };
            if !(0..rank).contains(&a) || values.is_empty() {
                return Err(Misfit(format!(
                    "classify: axis {axis} is not an axis of an output of shape {shape:?}"
                )));
            }
            let a = a as usize;
            let classes = shape.get(a).copied().unwrap_or(values.len()).max(1);
            let inner: usize = shape.get(a + 1..).map_or(1, |s| s.iter().product());
            let outer = values.len() / (classes * inner).max(1);
            if outer * classes * inner != values.len() {
                return Err(Misfit(format!(
                    "classify: {} values do not split into {classes} classes on axis {a}",
                    values.len()
                )));
            }
            if outer * inner > MAX_POSITIONS {
                return Err(Misfit(format!(
                    "classify: {} positions of {classes} classes is more than a result holds \
                     ({MAX_POSITIONS}); use `raw`, or the axis the classes are on",
                    outer * inner
                )));
            }
            // Positions in row-major order of the other axes; a position's scores are strided
            // `inner` apart.
            let mut rows: Vec<Vec<Class>> = Vec::with_capacity(outer * inner);
            let mut row = vec![0f32; classes];
            for o in 0..outer {
                for i in 0..inner {
                    for (c, r) in row.iter_mut().enumerate() {
                        *r = values[(o * classes + c) * inner + i];
                    }
                    if *sm {
                        softmax(&mut row);
                    }
                    rows.push(top_k(&row, k.get(), labels));
                }
            }
            Ok(match rows.len() {
                1 => json!({"top": rows.pop()}),
                _ => json!({"steps": rows}),
            })
        }
        Postprocess::Ctc { blank, .. } => {
            let charset = ctx.charset.unwrap_or(&[]);
            ctc(shape, &values, charset, *blank)
        }
        Postprocess::TextBoxes {
            threshold,
            box_threshold,
            unclip_ratio,
            min_size,
            max_boxes,
        } => {
            let (h, w) = match shape {
                [1, 1, h, w] | [1, h, w] => (*h, *w),
                _ => {
                    return Err(Misfit(format!(
                        "text_boxes reads a [1, 1, H, W] probability map, not {shape:?}"
                    )));
                }
            };
            let boxes = text_boxes(
                &values,
                (h, w),
                BoxParams {
                    threshold: *threshold,
                    box_threshold: *box_threshold,
                    unclip_ratio: *unclip_ratio,
                    min_size: *min_size,
                    max_boxes: *max_boxes,
                },
                ctx.geometry,
            );
            Ok(json!({ "boxes": boxes }))
        }
        Postprocess::Detect {
            format,
            score_threshold,
            iou_threshold,
            max_boxes,
            labels,
            normalized,
            background,
        } => {
            let rows = detect_rows(*format, shape, &values)?;
            let boxes = detect(
                rows,
                DetectParams {
                    score_threshold: *score_threshold,
                    iou_threshold: *iou_threshold,
                    max_boxes: *max_boxes,
                    normalized: *normalized,
                    background: *background,
                },
                ctx.geometry,
            );
            let boxes: Vec<Value> = boxes
                .into_iter()
                .map(|b| {
                    let label = labels
                        .get(b.class)
                        .cloned()
                        .unwrap_or_else(|| b.class.to_string());
                    json!({"x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1,
                           "score": b.score, "class": b.class, "label": label})
                })
                .collect();
            Ok(json!({ "boxes": boxes }))
        }
        Postprocess::Score {
            threshold,
            hysteresis,
        } => {
            let [v] = values[..] else {
                return Err(Misfit(format!(
                    "score reads one value, the output has shape {shape:?}"
                )));
            };
            let Some(t) = threshold else {
                return Ok(json!({ "score": v }));
            };
            let was = on.unwrap_or(false);
            let now = if was { v >= t - hysteresis } else { v >= *t };
            let mut out = json!({ "score": v, "on": now });
            // An event is a flip within a stream: a stream's first step (and every single
            // request, which is a stream of one) has nothing to flip from.
            if on.is_some() && now != was {
                out["event"] = json!(if now { "start" } else { "stop" });
            }
            *on = Some(now);
            Ok(out)
        }
        Postprocess::Raw { max_values } => {
            let truncated = values.len() > *max_values;
            values.truncate(*max_values);
            Ok(json!({"shape": shape, "values": values, "truncated": truncated}))
        }
    }
}

/// Greedy CTC: the best class per step, repeats merged, blanks dropped.
fn ctc(shape: &[usize], values: &[f32], charset: &[String], blank: usize) -> Result<Value, Misfit> {
    let (steps, classes) = match shape {
        [1, t, c] | [t, c] => (*t, *c),
        _ => {
            return Err(Misfit(format!(
                "ctc reads a [1, T, classes] output, not {shape:?}"
            )));
        }
    };
    if charset.len() != classes {
        return Err(Misfit(format!(
            "ctc: the charset has {} entries, the output {classes} classes",
            charset.len()
        )));
    }
    let mut text = String::new();
    let mut chars = Vec::new();
    let mut prev = None;
    for t in 0..steps {
        let row = &values[t * classes..(t + 1) * classes];
        let (best, score) =
            row.iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (i, s)| if s > a.1 { (i, s) } else { a },
                );
        if Some(best) != prev && best != blank {
            text.push_str(&charset[best]);
            chars.push(json!({"char": charset[best], "score": score, "step": t}));
        }
        prev = Some(best);
    }
    let mean = match chars.len() {
        0 => 0.0,
        n => {
            chars
                .iter()
                .map(|c| c["score"].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / n as f64
        }
    };
    Ok(json!({"text": text, "score": mean, "chars": chars}))
}

/// One candidate: corners in model pixels (or fractions), its best class and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
    pub score: f32,
    pub class: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct DetectParams {
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub max_boxes: usize,
    pub normalized: bool,
    pub background: Option<usize>,
}

/// A detector row: corners, then a score per class.
type Row = ([f32; 4], Vec<f32>);

/// Each row of a detector's output as corners plus per-class scores.
fn detect_rows(format: DetectFormat, shape: &[usize], v: &[f32]) -> Result<Vec<Row>, Misfit> {
    let (n, width, transposed) = match (format, shape) {
        (DetectFormat::Yolo, [1, n, k]) if *k > 5 => (*n, *k, false),
        (DetectFormat::Ssd, [1, n, k]) if *k > 4 => (*n, *k, false),
        (DetectFormat::Yolov8, [1, k, n]) if *k > 4 => (*n, *k, true),
        _ => {
            let want = match format {
                DetectFormat::Yolo => "[1, N, 5 + classes]",
                DetectFormat::Yolov8 => "[1, 4 + classes, N]",
                DetectFormat::Ssd => "[1, N, 4 + classes]",
            };
            return Err(Misfit(format!(
                "detect ({format:?}) reads a {want} output, not {shape:?}"
            )));
        }
    };
    let at = |row: usize, col: usize| {
        if transposed {
            v[col * n + row]
        } else {
            v[row * width + col]
        }
    };
    Ok((0..n)
        .map(|r| {
            let b = [at(r, 0), at(r, 1), at(r, 2), at(r, 3)];
            let corners = match format {
                DetectFormat::Ssd => b,
                _ => [
                    b[0] - b[2] / 2.0,
                    b[1] - b[3] / 2.0,
                    b[0] + b[2] / 2.0,
                    b[1] + b[3] / 2.0,
                ],
            };
            let scores = match format {
                DetectFormat::Yolo => {
                    let obj = at(r, 4);
                    (5..width).map(|c| obj * at(r, c)).collect()
                }
                _ => (4..width).map(|c| at(r, c)).collect(),
            };
            (corners, scores)
        })
        .collect())
}

fn iou(a: &Detection, b: &Detection) -> f32 {
    let w = (a.x1.min(b.x1) - a.x0.max(b.x0)).max(0.0);
    let h = (a.y1.min(b.y1) - a.y0.max(b.y0)).max(0.0);
    let inter = w * h;
    let area = |d: &Detection| (d.x1 - d.x0).max(0.0) * (d.y1 - d.y0).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Each row's best class over the threshold, class-aware non-maximum suppression (highest
/// score first), at most `max_boxes`, mapped into the original image.
pub fn detect(rows: Vec<Row>, p: DetectParams, geometry: Option<Geometry>) -> Vec<Detection> {
    let mut cands: Vec<Detection> = rows
        .into_iter()
        .filter_map(|(c, scores)| {
            let (class, score) = scores
                .iter()
                .copied()
                .enumerate()
                .filter(|(i, _)| Some(*i) != p.background)
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (i, s)| if s > a.1 { (i, s) } else { a },
                );
            (score >= p.score_threshold && score.is_finite()).then_some(Detection {
                x0: c[0],
                y0: c[1],
                x1: c[2],
                y1: c[3],
                score,
                class,
            })
        })
        .collect();
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in cands {
        if kept.len() >= p.max_boxes {
            break;
        }
        if !kept
            .iter()
            .any(|k| k.class == d.class && iou(k, &d) > p.iou_threshold)
        {
            kept.push(d);
        }
    }
    if let Some(g) = geometry {
        let (fx, fy) = match p.normalized {
            true => (g.model_width as f32, g.model_height as f32),
            false => (1.0, 1.0),
        };
        for d in &mut kept {
            (d.x0, d.y0) = g.to_image(d.x0 * fx, d.y0 * fy);
            (d.x1, d.y1) = g.to_image(d.x1 * fx, d.y1 * fy);
        }
    }
    kept
}

#[derive(Debug, Clone, Copy)]
pub struct BoxParams {
    pub threshold: f32,
    pub box_threshold: f32,
    pub unclip_ratio: f32,
    pub min_size: usize,
    pub max_boxes: usize,
}

/// A box in the original image's pixels.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TextBox {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
    pub score: f32,
}

/// DB text detection: the map thresholded, each 8-connected region a candidate, kept if its
/// mean probability reaches `box_threshold`, grown by area × ratio / perimeter (the map marks a
/// shrunk core of each text line), and mapped back through the resize. Axis-aligned boxes, in
/// reading order (top to bottom, then left to right).
pub fn text_boxes(
    map: &[f32],
    (h, w): (usize, usize),
    p: BoxParams,
    geometry: Option<Geometry>,
) -> Vec<TextBox> {
    let mut seen = vec![false; map.len()];
    let mut boxes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..map.len() {
        if seen[start] || map[start] <= p.threshold {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        let (mut sum, mut n) = (0f64, 0usize);
        while let Some(i) = stack.pop() {
            let (y, x) = (i / w, i % w);
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            sum += f64::from(map[i]);
            n += 1;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                    if ny < 0 || nx < 0 || ny >= h as i64 || nx >= w as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if !seen[j] && map[j] > p.threshold {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let (bw, bh) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
        let score = (sum / n as f64) as f32;
        if score < p.box_threshold || bw.min(bh) < p.min_size as f32 {
            continue;
        }
        let d = bw * bh * p.unclip_ratio / (2.0 * (bw + bh));
        boxes.push(TextBox {
            x0: x0 as f32 - d,
            y0: y0 as f32 - d,
            x1: (x1 + 1) as f32 + d,
            y1: (y1 + 1) as f32 + d,
            score,
        });
    }
    boxes.sort_by(|a, b| b.score.total_cmp(&a.score));
    boxes.truncate(p.max_boxes);
    // The map may be smaller than the model input (a strided head): its pixels in model
    // pixels first, then back through the resize.
    let g = geometry.unwrap_or(Geometry::stretch(w as u32, h as u32, w as u32, h as u32));
    let (mx, my) = (
        g.model_width as f32 / w as f32,
        g.model_height as f32 / h as f32,
    );
    for b in &mut boxes {
        let (x0, y0) = g.to_image(b.x0 * mx, b.y0 * my);
        let (x1, y1) = g.to_image(b.x1 * mx, b.y1 * my);
        (b.x0, b.y0, b.x1, b.y1) = (x0.round(), y0.round(), x1.round(), y1.round());
    }
    boxes.sort_by(|a, b| a.y0.total_cmp(&b.y0).then(a.x0.total_cmp(&b.x0)));
    boxes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    #[test]
    fn detect_keeps_the_best_box_per_object_and_class() {
        // Rows: cx, cy, w, h, objectness, 2 class scores. Two overlapping boxes of class 0,
        // one of class 1 over them, one under the threshold.
        let rows = [
            [10.0, 10.0, 8.0, 8.0, 0.9, 0.9, 0.1],
            [11.0, 10.0, 8.0, 8.0, 0.8, 0.9, 0.1],
            [10.0, 10.0, 8.0, 8.0, 0.9, 0.2, 0.8],
            [30.0, 30.0, 4.0, 4.0, 0.1, 0.9, 0.1],
        ];
        let v: Vec<f32> = rows.iter().flatten().copied().collect();
        let post = Postprocess::Detect {
            format: DetectFormat::Yolo,
            score_threshold: 0.25,
            iou_threshold: 0.45,
            max_boxes: 10,
            labels: vec!["a".into(), "b".into()],
            normalized: false,
            background: None,
        };
        // Letterboxed: a 40x20 image in a 40x40 input, 10 pixels of pad on top.
        let g = Geometry {
            pad_top: 10.0,
            ..Geometry::stretch(40, 20, 40, 20)
        };
        let c = Context {
            charset: None,
            geometry: Some(Geometry {
                model_height: 40,
                ..g
            }),
        };
        let out = apply(&post, &[1, 4, 7], v, &c, &mut None).unwrap();
        let boxes = out["boxes"].as_array().unwrap();
        assert_eq!(boxes.len(), 2, "{out}");
        assert_eq!(boxes[0]["label"], "a");
        assert!((boxes[0]["score"].as_f64().unwrap() - 0.81).abs() < 1e-6);
        assert_eq!(boxes[1]["label"], "b");
        assert_eq!(
            (boxes[0]["x0"].as_f64(), boxes[0]["y0"].as_f64()),
            (Some(6.0), Some(0.0))
        );
        assert_eq!(
            boxes[0]["y1"].as_f64(),
            Some(4.0),
            "14 in the input is 4 in the image"
        );
        let e = apply(&post, &[1, 7, 4], vec![0.0; 28], &c, &mut None).unwrap_err();
        assert!(e.0.contains("[1, N, 5 + classes]"), "{}", e.0);
    }

    fn ctx() -> Context<'static> {
        Context {
            charset: None,
            geometry: None,
        }
    }

    #[test]
    fn classify_gives_one_top_or_one_per_step() {
        let post = Postprocess::Classify {
            softmax: false,
            top_k: NonZeroUsize::new(1).unwrap(),
            labels: vec!["no".into(), "yes".into()],
            axis: Some(-1),
        };
        let one = apply(&post, &[1, 2], vec![0.2, 0.8], &ctx(), &mut None).unwrap();
        assert_eq!(one["top"][0]["label"], "yes");
        let steps = apply(
            &post,
            &[1, 2, 2],
            vec![0.9, 0.1, 0.3, 0.7],
            &ctx(),
            &mut None,
        )
        .unwrap();
        assert_eq!(steps["steps"][0][0]["label"], "no");
        assert_eq!(steps["steps"][1][0]["label"], "yes");
        // Classes on axis 1 of [1, 2, 2]: position 0 reads (0.9, 0.3), position 1 (0.1, 0.7).
        let on_1 = Postprocess::Classify {
            softmax: false,
            top_k: NonZeroUsize::new(1).unwrap(),
            labels: vec!["no".into(), "yes".into()],
            axis: Some(1),
        };
        let v = vec![0.9, 0.1, 0.3, 0.7];
        let steps = apply(&on_1, &[1, 2, 2], v, &ctx(), &mut None).unwrap();
        assert_eq!(steps["steps"][0][0]["label"], "no");
        assert_eq!(steps["steps"][0][0]["score"], 0.9f32);
        assert_eq!(steps["steps"][1][0]["label"], "yes");
        assert_eq!(steps["steps"][1][0]["score"], 0.7f32);
        let e = apply(&on_1, &[2], vec![0.5, 0.5], &ctx(), &mut None).unwrap_err();
        assert!(e.0.contains("axis 1"), "{}", e.0);
    }

    #[test]
    fn ctc_merges_repeats_and_drops_blanks() {
        let charset: Vec<String> = ["", "a", "b"].iter().map(|s| s.to_string()).collect();
        // Steps: a a _ a b b _ → "aab".
        let best = [1, 1, 0, 1, 2, 2, 0];
        let mut v = vec![0.0; best.len() * 3];
        for (t, c) in best.iter().enumerate() {
            v[t * 3 + c] = 0.9;
        }
        let post = Postprocess::Ctc {
            charset: "c.txt".into(),
            blank: 0,
        };
        let c = Context {
            charset: Some(&charset),
            geometry: None,
        };
        let out = apply(&post, &[1, 7, 3], v.clone(), &c, &mut None).unwrap();
        assert_eq!(out["text"], "aab");
        assert_eq!(out["chars"][2]["step"], 4);
        let short = Context {
            charset: Some(&charset[..2]),
            geometry: None,
        };
        let e = apply(&post, &[1, 7, 3], v, &short, &mut None).unwrap_err();
        assert!(e.0.contains("charset has 2 entries"), "{}", e.0);
    }

    #[test]
    fn scores_turn_into_events_with_hysteresis() {
        let post = Postprocess::Score {
            threshold: Some(0.5),
            hysteresis: 0.2,
        };
        let mut on = None;
        let events: Vec<Option<String>> = [0.1, 0.6, 0.4, 0.35, 0.2, 0.9]
            .iter()
            .map(|v| {
                let out = apply(&post, &[1, 1], vec![*v], &ctx(), &mut on).unwrap();
                out["event"].as_str().map(str::to_string)
            })
            .collect();
        // 0.4 and 0.35 stay on (above 0.5 - 0.2); 0.2 stops it.
        let want = [None, Some("start"), None, None, Some("stop"), Some("start")];
        assert_eq!(events, want.map(|e| e.map(str::to_string)));
        // A stream's first step has nothing to flip from: on, but no event.
        let out = apply(&post, &[1, 1], vec![0.9], &ctx(), &mut None).unwrap();
        assert_eq!((out["on"].as_bool(), out.get("event")), (Some(true), None));
        let e = apply(&post, &[2], vec![0.1, 0.2], &ctx(), &mut on).unwrap_err();
        assert!(e.0.contains("one value"), "{}", e.0);
    }

    #[test]
    fn text_boxes_find_regions_and_map_them_back() {
        // A 10x20 map with two bright bars; the image was 40 wide, 20 high (2x, 2x).
        let (h, w) = (10, 20);
        let mut map = vec![0.0f32; h * w];
        for y in 2..4 {
            for x in 2..12 {
                map[y * w + x] = 0.9;
            }
        }
        for y in 6..9 {
            for x in 5..18 {
                map[y * w + x] = 0.8;
            }
        }
        map[9 * w] = 0.95; // one pixel of noise: under min_size
        let p = BoxParams {
            threshold: 0.3,
            box_threshold: 0.5,
            unclip_ratio: 0.0,
            min_size: 2,
            max_boxes: 10,
        };
        let g = Geometry::stretch(40, 20, 20, 10);
        let boxes = text_boxes(&map, (h, w), p, Some(g));
        assert_eq!(boxes.len(), 2, "{boxes:?}");
        assert_eq!(
            (boxes[0].x0, boxes[0].y0, boxes[0].x1, boxes[0].y1),
            (4.0, 4.0, 24.0, 8.0)
        );
        assert_eq!(
            (boxes[1].x0, boxes[1].y0, boxes[1].x1, boxes[1].y1),
            (10.0, 12.0, 36.0, 18.0)
        );
        let grown = text_boxes(
            &map,
            (h, w),
            BoxParams {
                unclip_ratio: 1.5,
                ..p
            },
            None,
        );
        assert!(grown[0].x0 < 2.0 && grown[0].y1 > 4.0, "{grown:?}");
    }
}
