//! What callers hand to a model, and how it becomes the model's input tensor.
//!
//! Every size is checked before memory is committed to it: encoded images are decoded under
//! pixel and allocation limits, tensors must match the manifest's shape exactly.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader, Limits, imageops::FilterType};

use super::EngineError;
use super::manifest::{Color, Filter, Layout, Manifest, Preprocess};

/// Largest image side tern decodes; a 16k camera frame is far beyond any edge model input.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest decoder allocation for one image.
pub const MAX_IMAGE_ALLOC: u64 = 256 * 1024 * 1024;
/// Largest JSON tensor file; larger tensors belong in `.npy`.
pub const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;
/// Largest number of elements in a raw tensor input.
pub const MAX_TENSOR_ELEMENTS: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub enum Input {
    /// PNG or JPEG bytes.
    Encoded(Vec<u8>),
    /// A tensor: its shape with or without the batch dimension, and row-major values.
    Tensor { shape: Vec<usize>, data: Vec<f32> },
    /// A raw frame as a camera delivers it.
    Frame {
        width: u32,
        height: u32,
        format: PixelFormat,
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Rgb24,
    Gray8,
}

/// A model input ready to run: the full shape including batch 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Input {
    /// Build an input from a file, by extension: `.png`, `.jpg`/`.jpeg`, `.npy`, `.json`.
    pub fn from_file(path: &Path, max_bytes: u64) -> Result<Input, EngineError> {
        let bad = |message: String| EngineError::Input {
            message: format!("{}: {message}", path.display()),
        };
        let unreadable = |e: std::io::Error| EngineError::Unreadable {
            message: format!("{}: {e}", path.display()),
        };
        let len = std::fs::metadata(path).map_err(unreadable)?.len();
        if len > max_bytes {
            return Err(bad(format!("{len} bytes is over the limit of {max_bytes}")));
        }
        // The file may grow after the size check: never read more than the limit.
        let mut bytes = Vec::with_capacity(len.min(max_bytes) as usize);
        std::fs::File::open(path)
            .and_then(|f| {
                std::io::Read::read_to_end(&mut std::io::Read::take(f, max_bytes + 1), &mut bytes)
            })
            .map_err(unreadable)?;
        if bytes.len() as u64 > max_bytes {
            return Err(bad(format!(
                "grew past the limit of {max_bytes} bytes while being read"
            )));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "png" | "jpg" | "jpeg" => Ok(Input::Encoded(bytes)),
            "npy" => Input::from_npy(&bytes).map_err(|e| bad(e.to_string())),
            // A JSON tree costs many times its text in memory: hold it to a tighter bound.
            "json" if bytes.len() > MAX_JSON_BYTES => Err(bad(format!(
                "JSON tensors are limited to {MAX_JSON_BYTES} bytes; use .npy"
            ))),
            "json" => Input::from_json(&bytes).map_err(|e| bad(e.to_string())),
            _ => Err(bad(format!(
                "unknown input type `.{ext}`; expected png, jpg, jpeg, npy or json"
            ))),
        }
    }

    /// A little-endian float32 `.npy` array.
    pub fn from_npy(bytes: &[u8]) -> Result<Input, EngineError> {
        let (shape, data) = read_npy_f32(bytes)?;
        Ok(Input::Tensor { shape, data })
    }

    /// A JSON number, or nested arrays of numbers with a rectangular shape.
    pub fn from_json(bytes: &[u8]) -> Result<Input, EngineError> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| EngineError::Input {
                message: format!("not JSON: {e}"),
            })?;
        let mut shape = Vec::new();
        let mut cur = &v;
        while let serde_json::Value::Array(a) = cur {
            shape.push(a.len());
            match a.first() {
                Some(first) => cur = first,
                None => break,
            }
        }
        let mut data = Vec::new();
        flatten_json(&v, &shape, 0, &mut data)?;
        Ok(Input::Tensor { shape, data })
    }

    /// Turn this input into the model's input tensor (batch of one).
    pub fn prepare(&self, m: &Manifest) -> Result<Prepared, EngineError> {
        let mut shape = vec![1];
        shape.extend(m.sample_shape());
        let mut data = vec![0f32; shape.iter().product()];
        self.write_into(m, &mut data)?;
        Ok(Prepared { shape, data })
    }

    /// Write the model's input tensor for this input (batch of one) into `out`, which holds
    /// exactly one sample. The engine passes tract's own input buffer here, so preprocessing
    /// writes every value once and nothing is copied after it.
    pub fn write_into(&self, m: &Manifest, out: &mut [f32]) -> Result<(), EngineError> {
        match self {
            Input::Tensor { shape, data } => tensor_into(m, shape, data, out),
            Input::Encoded(bytes) => image_into(m, decode(bytes)?, out),
            Input::Frame {
                width,
                height,
                format,
                data,
            } => {
                let channels = match format {
                    PixelFormat::Rgb24 => 3,
                    PixelFormat::Gray8 => 1,
                };
                let want = (*width as usize)
                    .checked_mul(*height as usize)
                    .and_then(|n| n.checked_mul(channels));
                if want != Some(data.len()) {
                    return Err(EngineError::Input {
                        message: format!(
                            "frame of {width}x{height} {format:?} needs {} bytes, got {}",
                            want.map_or("more than usize".to_string(), |n| n.to_string()),
                            data.len()
                        ),
                    });
                }
                // The camera's common case: the frame already has the model's size and color,
                // so its bytes are converted in place, without an intermediate image.
                if let Some(pre) = &m.preprocess
                    && m.image_size() == Some((*height as usize, *width as usize))
                    && pre.color.channels() == channels
                {
                    return pixels_into(m, pre, data, out);
                }
                let img = match format {
                    PixelFormat::Rgb24 => image::RgbImage::from_raw(*width, *height, data.clone())
                        .map(DynamicImage::ImageRgb8),
                    PixelFormat::Gray8 => image::GrayImage::from_raw(*width, *height, data.clone())
                        .map(DynamicImage::ImageLuma8),
                };
                image_into(m, img.expect("length checked above"), out)
            }
        }
    }
}

fn flatten_json(
    v: &serde_json::Value,
    shape: &[usize],
    depth: usize,
    out: &mut Vec<f32>,
) -> Result<(), EngineError> {
    let err = |message: String| EngineError::Input { message };
    match v {
        serde_json::Value::Array(a) => {
            if depth >= shape.len() || a.len() != shape[depth] {
                return Err(err(format!("ragged array at depth {depth}: not a tensor")));
            }
            for x in a {
                flatten_json(x, shape, depth + 1, out)?;
            }
            if out.len() > MAX_TENSOR_ELEMENTS {
                return Err(err(format!("more than {MAX_TENSOR_ELEMENTS} elements")));
            }
            Ok(())
        }
        serde_json::Value::Number(n) if depth == shape.len() => {
            out.push(
                n.as_f64()
                    .ok_or_else(|| err(format!("{n} is not a float")))? as f32,
            );
            Ok(())
        }
        other if depth == shape.len() => Err(err(format!("expected a number, found {other}"))),
        _ => Err(err(format!("ragged array at depth {depth}: not a tensor"))),
    }
}

/// Read a `.npy` holding float32 values; any other dtype is refused by name.
pub fn read_npy_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), EngineError> {
    let err = |message: String| EngineError::Input {
        message: format!("npy: {message}"),
    };
    let npy = npyz::NpyFile::new(bytes).map_err(|e| err(e.to_string()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|d| *d as usize).collect();
    let count = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    match count {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => {}
        _ => return Err(err(format!("shape {shape:?} is too large"))),
    }
    let dtype = npy.dtype();
    let is_f32 = matches!(&dtype, npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4);
    if !is_f32 {
        return Err(err(format!("dtype {} is not float32 (<f4)", dtype.descr())));
    }
    if npy.order() != npyz::Order::C {
        return Err(err("Fortran-order arrays are not supported".into()));
    }
    let data = npy.into_vec::<f32>().map_err(|e| err(e.to_string()))?;
    Ok((shape, data))
}

fn decode(bytes: &[u8]) -> Result<DynamicImage, EngineError> {
    let err = |message: String| EngineError::Input { message };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read image: {e}")))?;
    if reader.format().is_none() {
        return Err(err("not a PNG or JPEG image".into()));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| err(format!("cannot decode image: {e}")))
}

fn image_into(m: &Manifest, img: DynamicImage, out: &mut [f32]) -> Result<(), EngineError> {
    let Some(pre) = &m.preprocess else {
        return Err(EngineError::Input {
            message: format!(
                "model `{}` takes tensors, not images (its manifest has no [preprocess])",
                m.name
            ),
        });
    };
    let (h, w) = m.image_size().expect("checked when the manifest was read");
    let img = if img.width() as usize == w && img.height() as usize == h {
        img
    } else if pre.resize.is_some() {
        img.resize_exact(w as u32, h as u32, filter(pre.filter))
    } else {
        return Err(EngineError::Input {
            message: format!(
                "image is {}x{}, model `{}` takes {w}x{h} and its manifest does not resize",
                img.width(),
                img.height(),
                m.name
            ),
        });
    };
    let pixels: Vec<u8> = match pre.color {
        Color::Gray => img.into_luma8().into_raw(),
        Color::Rgb => img.into_rgb8().into_raw(),
    };
    pixels_into(m, pre, &pixels, out)
}

/// Interleaved 8-bit pixels of the model's size and color into the input layout, scaled and
/// normalised.
fn pixels_into(
    m: &Manifest,
    pre: &Preprocess,
    pixels: &[u8],
    out: &mut [f32],
) -> Result<(), EngineError> {
    let c = pre.color.channels();
    if pixels.len() != out.len() {
        let (h, w) = m.image_size().unwrap_or((0, 0));
        return Err(EngineError::Input {
            message: format!(
                "a {w}x{h} {:?} image gives {} values, model `{}` takes shape {:?}",
                pre.color,
                pixels.len(),
                m.name,
                m.sample_shape()
            ),
        });
    }
    let per_channel = |v: &[f32], ch: usize, default: f32| match v.len() {
        0 => default,
        1 => v[0],
        _ => v[ch],
    };
    // Fold scale, mean and std into one multiply-add per value.
    let mut mul = [0f32; 3];
    let mut add = [0f32; 3];
    for ch in 0..c {
        let inv_std = 1.0 / per_channel(&pre.std, ch, 1.0);
        mul[ch] = pre.scale * inv_std;
        add[ch] = -per_channel(&pre.mean, ch, 0.0) * inv_std;
    }
    match m.input.layout {
        Layout::Nhwc | Layout::Nc => {
            for (d, p) in out.chunks_exact_mut(c).zip(pixels.chunks_exact(c)) {
                for ch in 0..c {
                    d[ch] = p[ch] as f32 * mul[ch] + add[ch];
                }
            }
        }
        Layout::Nchw => {
            let plane_len = out.len() / c;
            for (ch, plane) in out.chunks_exact_mut(plane_len).enumerate() {
                for (d, p) in plane.iter_mut().zip(pixels.iter().skip(ch).step_by(c)) {
                    *d = *p as f32 * mul[ch] + add[ch];
                }
            }
        }
    }
    Ok(())
}

fn tensor_into(
    m: &Manifest,
    shape: &[usize],
    data: &[f32],
    out: &mut [f32],
) -> Result<(), EngineError> {
    let sample = m.sample_shape();
    let fits = shape == sample.as_slice()
        || (shape.len() == sample.len() + 1 && shape[0] == 1 && shape[1..] == sample[..]);
    if !fits {
        return Err(EngineError::Input {
            message: format!(
                "tensor of shape {shape:?} does not fit model `{}`, which takes {:?} (or [1, ...])",
                m.name, sample
            ),
        });
    }
    if data.len() != out.len() {
        return Err(EngineError::Input {
            message: format!("tensor of shape {shape:?} holds {} values", data.len()),
        });
    }
    if data.iter().any(|x| !x.is_finite()) {
        return Err(EngineError::Input {
            message: "tensor holds NaN or infinite values".into(),
        });
    }
    out.copy_from_slice(data);
    Ok(())
}

fn filter(f: Filter) -> FilterType {
    match f {
        Filter::Nearest => FilterType::Nearest,
        Filter::Triangle => FilterType::Triangle,
        Filter::CatmullRom => FilterType::CatmullRom,
        Filter::Lanczos3 => FilterType::Lanczos3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest for a 4-wide, 2-high RGB model without resizing, NCHW.
    fn wide() -> Manifest {
        Manifest::parse(
            r#"
name = "wide"
version = "1.0.0"
[input]
name = "input"
dtype = "f32"
shape = ["N", 3, 2, 4]
layout = "nchw"
[preprocess]
color = "rgb"
[output]
name = "probs"
[selftest]
tolerance = 0.0
[[selftest.golden]]
input = "a.npy"
output = "b.npy"
"#,
        )
        .unwrap()
    }

    #[test]
    fn frames_keep_width_and_height_apart_and_land_in_planes() {
        let m = wide();
        // Pixel i has value (i, 100 + i, 200 + i) in R, G, B.
        let data: Vec<u8> = (0..8u8).flat_map(|i| [i, 100 + i, 200 + i]).collect();
        let frame = Input::Frame {
            width: 4,
            height: 2,
            format: PixelFormat::Rgb24,
            data,
        };
        let t = frame.prepare(&m).unwrap();
        assert_eq!(t.shape, [1, 3, 2, 4]);
        let want: Vec<f32> = (0..3)
            .flat_map(|c| (0..8).map(move |i| (c * 100 + i) as f32))
            .collect();
        assert_eq!(t.data, want);
        // The same bytes as 2 wide, 4 high are not the model's size, and it does not resize.
        let tall = Input::Frame {
            width: 2,
            height: 4,
            format: PixelFormat::Rgb24,
            data: vec![0; 24],
        };
        match tall.prepare(&m) {
            Err(EngineError::Input { message }) => assert!(message.contains("2x4"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
