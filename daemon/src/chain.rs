//! Stages: after a model that finds boxes (`detect`, `text_boxes`), more models run on each
//! box's crop of the same image, and their outputs join the box in the one result.
//!
//! ```text
//!  image ─► pipeline's model ─► boxes ─► crops (+ crop_pad; highest scores first, at most
//!                                          max_crops) ─► stage 1 on all ─► [turn each upright]
//!                                          ─► stage 2 on all …  (together where a stage's
//!                                          model has a named batch)
//!  one result: the boxes, each with "stages": [{model, version, top, outputs} …]
//! ```
//!
//! The whole chain of a sample runs inside its one flight and commits in its one transaction:
//! a frame is counted, dropped or held back once whatever its number of crops, and a crash in
//! the middle of a chain leaves nothing of it.

use image::RgbImage;
use serde_json::{Value, json};

use crate::config::Stage;
use crate::engine::{EngineError, Input, ModelPool, PixelFormat, Postprocess, Prediction};

pub struct Chain {
    /// The output of the pipeline's model that holds the boxes.
    boxes: String,
    stages: Vec<(Stage, ModelPool)>,
    max_crops: usize,
    pad: f32,
}

impl Chain {
    /// A chain after `first`, or why the model finds no boxes to crop.
    pub fn new(
        first: &crate::engine::Manifest,
        stages: Vec<(Stage, ModelPool)>,
        max_crops: usize,
        pad: f32,
    ) -> Result<Chain, String> {
        let boxes = first
            .outputs
            .iter()
            .find(|o| {
                matches!(
                    o.postprocess,
                    Postprocess::Detect { .. } | Postprocess::TextBoxes { .. }
                )
            })
            .ok_or_else(|| {
                format!(
                    "model `{}` finds no boxes (no `detect` or `text_boxes` output) for stages to crop",
                    first.name
                )
            })?
            .name
            .clone();
        Ok(Chain {
            boxes,
            stages,
            max_crops,
            pad,
        })
    }

    /// Run every stage on the boxes `pred` found in `image`, adding each box's `stages`.
    pub async fn run(&self, image: Input, pred: &mut Prediction) {
        let Some(boxes) = pred
            .outputs
            .get_mut(&self.boxes)
            .and_then(|o| o.get_mut("boxes"))
            .and_then(Value::as_array_mut)
        else {
            return;
        };
        if boxes.is_empty() {
            return;
        }
        // The highest scores get the crops; the rest stay as found, said to be skipped.
        let mut order: Vec<usize> = (0..boxes.len()).collect();
        let score = |b: &Value| b["score"].as_f64().unwrap_or(0.0);
        order.sort_by(|&a, &b| score(&boxes[b]).total_cmp(&score(&boxes[a])));
        order.truncate(self.max_crops);
        let decoded = tokio::task::spawn_blocking(move || image.rgb()).await;
        let rgb = match decoded {
            Ok(Ok(i)) => std::sync::Arc::new(i),
            Ok(Err(e)) => return say_error(boxes, &order, &e.to_string()),
            Err(e) => return say_error(boxes, &order, &format!("decoding panicked: {e}")),
        };
        // Each stage takes every crop still going at once, so a model that batches (a named
        // batch in its manifest) runs them together.
        struct Crop {
            box_ix: usize,
            image: RgbImage,
            said: Vec<Value>,
            going: bool,
        }
        let mut crops = Vec::with_capacity(order.len());
        for (i, b) in boxes.iter_mut().enumerate() {
            if !order.contains(&i) {
                b["stages"] = json!("skipped: over max_crops");
                continue;
            }
            match crop(&rgb, b, self.pad) {
                Some(image) => crops.push(Crop {
                    box_ix: i,
                    image,
                    said: Vec::with_capacity(self.stages.len()),
                    going: true,
                }),
                None => b["stages"] = json!("skipped: empty box"),
            }
        }
        for (stage, pool) in &self.stages {
            let mut going: Vec<&mut Crop> = crops.iter_mut().filter(|c| c.going).collect();
            if going.is_empty() {
                break;
            }
            // Crops of like shape side by side: a model that batches pads them least.
            going.sort_by(|a, b| {
                let r = |c: &Crop| c.image.width() as f32 / c.image.height().max(1) as f32;
                r(a).total_cmp(&r(b))
            });
            let inputs = going
                .iter()
                .map(|c| Input::Frame {
                    width: c.image.width(),
                    height: c.image.height(),
                    format: PixelFormat::Rgb24,
                    data: c.image.as_raw().clone(),
                })
                .collect();
            let answers = pool.infer_batch_waiting(inputs).await;
            for (c, answer) in going.into_iter().zip(answers) {
                match answer {
                    Ok(p) => {
                        let mut s = json!({
                            "model": p.model, "version": p.version, "top": p.top,
                            "latency_us": p.latency_us,
                        });
                        if !p.outputs.is_empty() {
                            s["outputs"] = Value::Object(p.outputs);
                        }
                        if let Some(n) = p.batch {
                            s["batch"] = json!(n);
                        }
                        if stage.rotate
                            && let Some(turn) = upright(&p.top, stage.min_score)
                        {
                            c.image = turned(&c.image, turn);
                            s["turned"] = json!(turn);
                        }
                        c.said.push(s);
                    }
                    Err(e) => {
                        c.said.push(stage_error(&stage.model, &e));
                        c.going = false;
                    }
                }
            }
            crate::crash_point("chain:stage");
        }
        for c in crops {
            boxes[c.box_ix]["stages"] = Value::Array(c.said);
        }
    }
}

fn stage_error(model: &str, e: &EngineError) -> Value {
    json!({"model": model, "error": {"code": e.code(), "message": e.to_string()}})
}

fn say_error(boxes: &mut [Value], order: &[usize], why: &str) {
    for &i in order {
        boxes[i]["stages"] = json!({"error": why});
    }
}

/// The rotation (degrees) a stage's top label says the crop has, if it is sure enough.
fn upright(top: &[crate::engine::Class], min_score: f32) -> Option<u32> {
    let c = top.first()?;
    let turn: u32 = c.label.trim().parse().ok()?;
    (c.score >= min_score && matches!(turn, 90 | 180 | 270)).then_some(turn)
}

/// The crop turned back by `turn` degrees.
fn turned(img: &RgbImage, turn: u32) -> RgbImage {
    match turn {
        90 => image::imageops::rotate270(img),
        180 => image::imageops::rotate180(img),
        270 => image::imageops::rotate90(img),
        _ => img.clone(),
    }
}

/// A box's pixels, grown by `pad` × its height on every side and kept inside the image.
fn crop(img: &RgbImage, b: &Value, pad: f32) -> Option<RgbImage> {
    let f = |k: &str| b[k].as_f64().map(|v| v as f32);
    let (x0, y0, x1, y1) = (f("x0")?, f("y0")?, f("x1")?, f("y1")?);
    if !(x1 > x0 && y1 > y0) {
        return None;
    }
    let grow = (y1 - y0) * pad;
    let (w, h) = (img.width() as f32, img.height() as f32);
    let left = (x0 - grow).floor().clamp(0.0, w);
    let top = (y0 - grow).floor().clamp(0.0, h);
    let right = (x1 + grow).ceil().clamp(0.0, w);
    let bottom = (y1 + grow).ceil().clamp(0.0, h);
    let (cw, ch) = ((right - left) as u32, (bottom - top) as u32);
    if cw == 0 || ch == 0 {
        return None;
    }
    Some(image::imageops::crop_imm(img, left as u32, top as u32, cw, ch).to_image())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_grow_by_the_pad_stay_inside_and_turn_upright() {
        let mut img = RgbImage::new(100, 50);
        img.put_pixel(10, 10, image::Rgb([255, 0, 0]));
        let b = json!({"x0": 10.0, "y0": 10.0, "x1": 30.5, "y1": 20.0});
        let c = crop(&img, &b, 0.0).unwrap();
        assert_eq!((c.width(), c.height()), (21, 10));
        assert_eq!(c.get_pixel(0, 0), &image::Rgb([255, 0, 0]));
        let c = crop(&img, &b, 0.5).unwrap();
        assert_eq!((c.width(), c.height()), (31, 20), "5 px more each side");
        let edge = json!({"x0": -20.0, "y0": 40.0, "x1": 5.0, "y1": 90.0});
        let c = crop(&img, &edge, 0.0).unwrap();
        assert_eq!((c.width(), c.height()), (5, 10));
        assert!(
            crop(
                &img,
                &json!({"x0": 5.0, "y0": 5.0, "x1": 5.0, "y1": 9.0}),
                0.0
            )
            .is_none()
        );
        assert!(
            crop(
                &img,
                &json!({"x0": 500.0, "y0": 5.0, "x1": 600.0, "y1": 9.0}),
                0.0
            )
            .is_none()
        );

        let top = |label: &str, score: f32| {
            vec![crate::engine::Class {
                index: 0,
                label: label.into(),
                score,
            }]
        };
        assert_eq!(upright(&top("180", 0.95), 0.9), Some(180));
        assert_eq!(upright(&top("180", 0.8), 0.9), None, "not sure enough");
        assert_eq!(upright(&top("0", 0.99), 0.9), None);
        assert_eq!(upright(&top("upside", 0.99), 0.9), None);
        let t = turned(&c, 180);
        assert_eq!((t.width(), t.height()), (5, 10));
        let wide = RgbImage::new(8, 2);
        assert_eq!(turned(&wide, 90).dimensions(), (2, 8));
    }
}
