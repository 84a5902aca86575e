//! What callers hand to a model, and how it becomes the model's input tensor.
//!
//! Every size is checked before memory is committed to it: encoded images are decoded under
//! pixel and allocation limits, tensors must match the manifest's shape exactly.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader, Limits, imageops::FilterType};

use super::EngineError;
use super::manifest::{Color, Filter, Layout, Manifest};

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
        let len = std::fs::metadata(path)
            .map_err(|e| bad(e.to_string()))?
            .len();
        if len > max_bytes {
            return Err(bad(format!("{len} bytes is over the limit of {max_bytes}")));
        }
        // The file may grow after the size check: never read more than the limit.
        let mut bytes = Vec::with_capacity(len.min(max_bytes) as usize);
        std::fs::File::open(path)
            .and_then(|f| {
                std::io::Read::read_to_end(&mut std::io::Read::take(f, max_bytes + 1), &mut bytes)
            })
            .map_err(|e| bad(e.to_string()))?;
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
        match self {
            Input::Tensor { shape, data } => prepare_tensor(m, shape, data),
            Input::Encoded(bytes) => prepare_image(m, decode(bytes)?),
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
                let img = match format {
                    PixelFormat::Rgb24 => image::RgbImage::from_raw(*width, *height, data.clone())
                        .map(DynamicImage::ImageRgb8),
                    PixelFormat::Gray8 => image::GrayImage::from_raw(*width, *height, data.clone())
                        .map(DynamicImage::ImageLuma8),
                };
                prepare_image(m, img.expect("length checked above"))
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

fn prepare_image(m: &Manifest, img: DynamicImage) -> Result<Prepared, EngineError> {
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
    let c = pre.color.channels();
    let pixels: Vec<u8> = match pre.color {
        Color::Gray => img.into_luma8().into_raw(),
        Color::Rgb => img.into_rgb8().into_raw(),
    };
    let per_channel = |v: &[f32], ch: usize, default: f32| match v.len() {
        0 => default,
        1 => v[0],
        _ => v[ch],
    };
    let mean: Vec<f32> = (0..c).map(|ch| per_channel(&pre.mean, ch, 0.0)).collect();
    let inv_std: Vec<f32> = (0..c)
        .map(|ch| 1.0 / per_channel(&pre.std, ch, 1.0))
        .collect();
    // Fold scale, mean and std into one multiply-add per value.
    let mul: Vec<f32> = (0..c).map(|ch| pre.scale * inv_std[ch]).collect();
    let add: Vec<f32> = (0..c).map(|ch| -mean[ch] * inv_std[ch]).collect();
    let mut data = vec![0f32; h * w * c];
    match m.input.layout {
        Layout::Nhwc | Layout::Nc => {
            for (d, p) in data.chunks_exact_mut(c).zip(pixels.chunks_exact(c)) {
                for ch in 0..c {
                    d[ch] = p[ch] as f32 * mul[ch] + add[ch];
                }
            }
        }
        Layout::Nchw => {
            for (ch, plane) in data.chunks_exact_mut(h * w).enumerate() {
                for (d, p) in plane.iter_mut().zip(pixels.iter().skip(ch).step_by(c)) {
                    *d = *p as f32 * mul[ch] + add[ch];
                }
            }
        }
    }
    let mut shape = vec![1];
    shape.extend(m.sample_shape());
    if shape.iter().product::<usize>() != data.len() {
        return Err(EngineError::Input {
            message: format!(
                "a {w}x{h} {:?} image gives {} values, model `{}` takes shape {:?}",
                pre.color,
                data.len(),
                m.name,
                &shape[1..]
            ),
        });
    }
    Ok(Prepared { shape, data })
}

fn prepare_tensor(m: &Manifest, shape: &[usize], data: &[f32]) -> Result<Prepared, EngineError> {
    let sample = m.sample_shape();
    let full = if shape == sample.as_slice() {
        let mut s = vec![1];
        s.extend_from_slice(shape);
        s
    } else if shape.len() == sample.len() + 1 && shape[0] == 1 && shape[1..] == sample[..] {
        shape.to_vec()
    } else {
        return Err(EngineError::Input {
            message: format!(
                "tensor of shape {shape:?} does not fit model `{}`, which takes {:?} (or [1, ...])",
                m.name, sample
            ),
        });
    };
    if data.iter().any(|x| !x.is_finite()) {
        return Err(EngineError::Input {
            message: "tensor holds NaN or infinite values".into(),
        });
    }
    Ok(Prepared {
        shape: full,
        data: data.to_vec(),
    })
}

fn filter(f: Filter) -> FilterType {
    match f {
        Filter::Nearest => FilterType::Nearest,
        Filter::Triangle => FilterType::Triangle,
        Filter::CatmullRom => FilterType::CatmullRom,
        Filter::Lanczos3 => FilterType::Lanczos3,
    }
}
