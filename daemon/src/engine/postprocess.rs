//! What an output's values mean: each postprocessor turns one output tensor into JSON that
//! `ternd infer --json`, the results table, MQTT results and D-Bus signals all carry.
//!
//! Pure functions of the values (and, for `score`, of the previous step's state): no tract.

use serde_json::{Value, json};

use super::input::Geometry;
use super::manifest::Postprocess;
use super::model::Class;

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
        } => {
            let classes = shape.last().copied().unwrap_or(1).max(1);
            if !values.len().is_multiple_of(classes) || values.is_empty() {
                return Err(Misfit(format!(
                    "classify: {} values do not split into rows of {classes} classes",
                    values.len()
                )));
            }
            let mut rows: Vec<Vec<Class>> = Vec::new();
            for row in values.chunks_mut(classes) {
                if *sm {
                    softmax(row);
                }
                rows.push(top_k(row, k.get(), labels));
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
            // The first step of a stream starts an event if it is on; it stops nothing.
            if now != was && (now || on.is_some()) {
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
    let (sx, sy, mw, mh) = match geometry {
        Some(g) => (
            g.width as f32 / g.model_width as f32,
            g.height as f32 / g.model_height as f32,
            g.width as f32,
            g.height as f32,
        ),
        None => (1.0, 1.0, w as f32, h as f32),
    };
    for b in &mut boxes {
        b.x0 = (b.x0 * sx).clamp(0.0, mw).round();
        b.x1 = (b.x1 * sx).clamp(0.0, mw).round();
        b.y0 = (b.y0 * sy).clamp(0.0, mh).round();
        b.y1 = (b.y1 * sy).clamp(0.0, mh).round();
    }
    boxes.sort_by(|a, b| a.y0.total_cmp(&b.y0).then(a.x0.total_cmp(&b.x0)));
    boxes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

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
        let g = Geometry {
            width: 40,
            height: 20,
            model_width: 20,
            model_height: 10,
        };
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
