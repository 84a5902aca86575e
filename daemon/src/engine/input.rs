//! What callers hand to a model, and how it becomes the model's input tensor.
//!
//! Every size is checked before memory is committed to it: encoded images are decoded under
//! pixel and allocation limits, tensors must match the manifest's shape exactly.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader, Limits, imageops::FilterType};

use super::EngineError;
use super::array::{Array, Data, read_npy, read_npz};
use super::manifest::{
    AudioSpec, Color, Dim, Filter, ImageSpec, InputSpec, Layout, Manifest, Resize,
};

/// Largest image side tern decodes; a 16k camera frame is far beyond any edge model input.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Largest decoder allocation for one image.
pub const MAX_IMAGE_ALLOC: u64 = 256 * 1024 * 1024;
/// Largest JSON tensor file; larger tensors belong in `.npy`.
pub const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;
pub use super::array::MAX_TENSOR_ELEMENTS;

#[derive(Debug, Clone)]
pub enum Input {
    /// PNG or JPEG bytes.
    Encoded(Vec<u8>),
    /// A float tensor for the model's one fed input: its shape with or without the batch
    /// dimension, and row-major values.
    Tensor { shape: Vec<usize>, data: Vec<f32> },
    /// Arrays by input name (an `.npz`; `in/<name>` is accepted for `<name>`).
    Arrays(Vec<(String, Array)>),
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

/// A request made into the model's fed inputs: one array per input, by the input's index in
/// the manifest, each with its full shape (batch included).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub arrays: Vec<(usize, Array)>,
    /// How an image was brought to the model's size, to map positions back.
    pub geometry: Option<Geometry>,
}

/// How an image was brought to the model's size: its size as given, the model's, and the
/// transform between them (model pixel = image pixel × scale + pad).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub width: u32,
    pub height: u32,
    pub model_width: u32,
    pub model_height: u32,
    pub scale_x: f32,
    pub scale_y: f32,
    pub pad_left: f32,
    pub pad_top: f32,
}

impl Geometry {
    /// A plain resize (or none) from `width`×`height` to the model's size.
    pub fn stretch(width: u32, height: u32, model_width: u32, model_height: u32) -> Geometry {
        Geometry {
            width,
            height,
            model_width,
            model_height,
            scale_x: model_width as f32 / width.max(1) as f32,
            scale_y: model_height as f32 / height.max(1) as f32,
            pad_left: 0.0,
            pad_top: 0.0,
        }
    }

    /// A point in model pixels as a point in the image, clamped to it.
    pub fn to_image(&self, x: f32, y: f32) -> (f32, f32) {
        (
            ((x - self.pad_left) / self.scale_x).clamp(0.0, self.width as f32),
            ((y - self.pad_top) / self.scale_y).clamp(0.0, self.height as f32),
        )
    }
}

impl Input {
    /// Build an input from a file, by extension: `.png`, `.jpg`/`.jpeg`, `.npy`, `.npz`, `.json`.
    pub fn from_file(path: &Path, max_bytes: u64) -> Result<Input, EngineError> {
        let bad = |message: String| EngineError::Input {
            message: format!("{}: {message}", path.display()),
        };
        let bytes = read_bounded(path, max_bytes)?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "png" | "jpg" | "jpeg" => Ok(Input::Encoded(bytes)),
            "npy" => Input::from_npy(&bytes).map_err(|e| bad(e.to_string())),
            "npz" => read_npz(&bytes)
                .map(Input::Arrays)
                .map_err(|e| bad(e.to_string())),
            // A JSON tree costs many times its text in memory: hold it to a tighter bound.
            "json" if bytes.len() > MAX_JSON_BYTES => Err(bad(format!(
                "JSON tensors are limited to {MAX_JSON_BYTES} bytes; use .npy"
            ))),
            "json" => Input::from_json(&bytes).map_err(|e| bad(e.to_string())),
            _ => Err(bad(format!(
                "unknown input type `.{ext}`; expected png, jpg, jpeg, npy, npz or json"
            ))),
        }
    }

    /// A `.npy`: float32 as a tensor for the fed input; other dtypes by the fed input's name.
    pub fn from_npy(bytes: &[u8]) -> Result<Input, EngineError> {
        let a = read_npy(bytes)?;
        match a.data {
            Data::F32(data) => Ok(Input::Tensor {
                shape: a.shape,
                data,
            }),
            _ => Ok(Input::Arrays(vec![(String::new(), a)])),
        }
    }

    /// A JSON number, or nested arrays of numbers with a rectangular shape. Read straight
    /// into the values, never into a JSON tree (which takes tens of bytes per number, where
    /// this takes four), and refused as soon as it goes wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Input, EngineError> {
        use serde::de::DeserializeSeed as _;
        let mut acc = JsonTensor::default();
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let read = JsonAt {
            depth: 0,
            acc: &mut acc,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if let Err(e) = read {
            let message = match e.classify() {
                serde_json::error::Category::Data => e.to_string(),
                _ => format!("not JSON: {e}"),
            };
            return Err(EngineError::Input { message });
        }
        let rank = acc.leaf.unwrap_or(acc.lens.len());
        let shape = acc.lens[..rank]
            .iter()
            .map(|l| l.expect("every array at a depth above the numbers has ended"))
            .collect();
        Ok(Input::Tensor {
            shape,
            data: acc.data,
        })
    }

    /// The image as 8-bit RGB (decoded within the same limits as for a model), for crops.
    pub fn rgb(&self) -> Result<image::RgbImage, EngineError> {
        match self {
            Input::Encoded(bytes) => Ok(decode(bytes)?.to_rgb8()),
            Input::Frame {
                width,
                height,
                format,
                data,
            } => frame_image(*width, *height, *format, data)
                .map(DynamicImage::into_rgb8)
                .ok_or_else(|| bad(format!("a {width}x{height} frame of {} bytes", data.len()))),
            _ => Err(bad("crops are cut from images, not tensors".into())),
        }
    }

    /// Turn this input into the model's fed inputs (batch of one).
    pub fn prepare(&self, m: &Manifest) -> Result<Prepared, EngineError> {
        let mut named = HashMap::new();
        match self {
            Input::Tensor { shape, data } => {
                let (ix, spec) = only_fed(m)?;
                if !spec.dtype.is_float() {
                    return Err(bad(format!(
                        "input `{}` of model `{}` takes {} values; send them in an .npy or .npz",
                        spec.name,
                        m.name,
                        spec.dtype.name()
                    )));
                }
                if data.iter().any(|x| !x.is_finite()) {
                    return Err(bad("tensor holds NaN or infinite values".into()));
                }
                let shape = fit_shape(m, spec, shape, &mut named)?;
                if data.len() != shape.iter().product::<usize>() {
                    return Err(bad(format!(
                        "tensor of shape {shape:?} holds {} values",
                        data.len()
                    )));
                }
                Ok(Prepared {
                    arrays: vec![(ix, Array::f32(shape, data.clone()))],
                    geometry: None,
                })
            }
            Input::Arrays(given) => {
                let mut arrays = Vec::new();
                for (name, a) in given {
                    let key = name.strip_prefix("in/").unwrap_or(name);
                    // A state input given by name starts the run from that state.
                    let found = if key.is_empty() {
                        Some(only_fed(m)?)
                    } else {
                        m.inputs
                            .iter()
                            .enumerate()
                            .find(|(_, s)| s.name == key && s.value.is_none())
                    };
                    let Some((ix, spec)) = found else {
                        // Reference outputs travel in the same archives as inputs.
                        if name.starts_with("out/") {
                            continue;
                        }
                        let names: Vec<_> = m.fed().map(|s| s.name.as_str()).collect();
                        return Err(bad(format!(
                            "`{key}` is not an input model `{}` is fed (it takes: {})",
                            m.name,
                            names.join(", ")
                        )));
                    };
                    if !a.data.fits(spec.dtype) {
                        return Err(bad(format!(
                            "input `{}` takes {}, the array is {}",
                            spec.name,
                            spec.dtype.name(),
                            a.data.dtype_name()
                        )));
                    }
                    if let Data::F32(v) = &a.data
                        && v.iter().any(|x| !x.is_finite())
                    {
                        return Err(bad(format!(
                            "input `{}` holds NaN or infinite values",
                            spec.name
                        )));
                    }
                    if arrays.iter().any(|(i, _)| *i == ix) {
                        return Err(bad(format!(
                            "two arrays for input `{}` (`{key}` and `in/{key}`?)",
                            spec.name
                        )));
                    }
                    let shape = fit_shape(m, spec, &a.shape, &mut named)?;
                    arrays.push((
                        ix,
                        Array {
                            shape,
                            data: a.data.clone(),
                        },
                    ));
                }
                for spec in m.fed() {
                    let ix = m.inputs.iter().position(|i| i.name == spec.name);
                    if !arrays.iter().any(|(i, _)| Some(*i) == ix) {
                        return Err(bad(format!(
                            "no array for input `{}` of model `{}`",
                            spec.name, m.name
                        )));
                    }
                }
                arrays.sort_by_key(|(i, _)| *i);
                Ok(Prepared {
                    arrays,
                    geometry: None,
                })
            }
            Input::Encoded(bytes) => image_input(m, decode(bytes)?),
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
                if let Some((ix, spec, pre)) = image_spec(m)
                    && m.image_size() == Some((*height as usize, *width as usize))
                    && pre.color.channels() == channels
                {
                    if let Some(b) = m.batch() {
                        named.insert(b.to_string(), 1);
                    }
                    let shape = spec.concrete_shape(&named);
                    let mut out = vec![0f32; shape.iter().product()];
                    pixels_into(pre, (*height as usize, *width as usize), data, &mut out);
                    return Ok(Prepared {
                        arrays: vec![(ix, Array::f32(shape, out))],
                        geometry: Some(Geometry::stretch(*width, *height, *width, *height)),
                    });
                }
                let img = frame_image(*width, *height, *format, data);
                image_input(m, img.expect("length checked above"))
            }
        }
    }
}

/// A raw frame's pixels as an image; `None` if the bytes are not that frame's.
fn frame_image(width: u32, height: u32, format: PixelFormat, data: &[u8]) -> Option<DynamicImage> {
    match format {
        PixelFormat::Rgb24 => {
            image::RgbImage::from_raw(width, height, data.to_vec()).map(DynamicImage::ImageRgb8)
        }
        PixelFormat::Gray8 => {
            image::GrayImage::from_raw(width, height, data.to_vec()).map(DynamicImage::ImageLuma8)
        }
    }
}

/// Most samples tern cuts into windows from one file (input files are smaller by default:
/// 16 MiB, under 9 minutes of 16-bit audio at 16 kHz).
const MAX_AUDIO_SAMPLES: usize = 64 * 1024 * 1024;

/// Raw PCM sample encodings `ternd infer` reads from `.s16le` and `.f32le` files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pcm {
    S16le,
    F32le,
}

/// Audio cut into the audio input's windows: each window's start (seconds into the audio) and
/// its input, `context` samples of the previous window then `window` new ones (zeros before
/// the start, and after the end to fill the last window). A WAV's channels are averaged and
/// its rate must be the manifest's (tern does not resample); raw PCM is mono at that rate.
pub fn audio_windows(
    m: &Manifest,
    bytes: &[u8],
    pcm: Option<Pcm>,
) -> Result<Vec<(f64, Input)>, EngineError> {
    let Some((spec, audio)) = m
        .inputs
        .iter()
        .find_map(|i| i.audio.as_ref().map(|a| (i, a)))
    else {
        return Err(bad(format!(
            "model `{}` declares no audio input ([inputs.audio])",
            m.name
        )));
    };
    let mono = match pcm {
        Some(p) => pcm_samples(bytes, p)?,
        None => wav_samples(m, bytes, audio.sample_rate)?,
    };
    if mono.is_empty() {
        return Err(bad("the audio holds no samples".into()));
    }
    let mut w = Windower::new(spec, audio, audio.window);
    let mut out = w.push(&mono);
    out.extend(w.finish());
    let rate = f64::from(audio.sample_rate);
    Ok(out
        .into_iter()
        .map(|(start, input)| (start as f64 / rate, input))
        .collect())
}

/// Cuts a stream of mono samples into a model's audio windows as they come: every `hop` new
/// samples, an input of the `context` samples before the step and the `window` from it
/// (zeros before the stream's start).
#[derive(Debug, Clone)]
pub struct Windower {
    input: String,
    shape: Vec<usize>,
    window: usize,
    context: usize,
    hop: usize,
    pub rate: u32,
    /// Samples from `base` on (a negative base: leading zeros before the start).
    buf: Vec<f32>,
    base: i64,
    /// The first new sample of the next window.
    next: i64,
}

impl Windower {
    pub fn new(spec: &InputSpec, audio: &AudioSpec, hop: usize) -> Windower {
        let shape = spec
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Named { .. } => 0,
            })
            .collect();
        let mut w = Windower {
            input: spec.name.clone(),
            shape,
            window: audio.window,
            context: audio.context,
            hop: hop.clamp(1, audio.window.max(1)),
            rate: audio.sample_rate,
            buf: Vec::new(),
            base: 0,
            next: 0,
        };
        w.reset();
        w
    }

    /// The model's audio input and a windower for it, or why the model takes no audio.
    pub fn for_model(m: &Manifest, hop: Option<usize>) -> Result<Windower, String> {
        let (spec, audio) = m
            .inputs
            .iter()
            .find_map(|i| i.audio.as_ref().map(|a| (i, a)))
            .ok_or_else(|| {
                format!(
                    "model `{}` declares no audio input ([inputs.audio])",
                    m.name
                )
            })?;
        Ok(Windower::new(spec, audio, hop.unwrap_or(audio.window)))
    }

    /// Start over: the next samples are the start of a new stream.
    pub fn reset(&mut self) {
        self.buf = vec![0.0; self.context];
        self.base = -(self.context as i64);
        self.next = 0;
    }

    /// New samples per window.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Samples taken since the start (the next sample's index).
    pub fn end(&self) -> i64 {
        self.base + self.buf.len() as i64
    }

    /// How many windows `n` more samples would complete.
    pub fn windows_after(&self, n: usize) -> usize {
        let last = self.end() + n as i64 - self.window as i64;
        if last < self.next {
            0
        } else {
            ((last - self.next) / self.hop as i64 + 1) as usize
        }
    }

    /// Take `samples`; each window now complete, with the index of its first new sample.
    pub fn push(&mut self, samples: &[f32]) -> Vec<(i64, Input)> {
        self.buf.extend_from_slice(samples);
        let mut out = Vec::new();
        while self.next + self.window as i64 <= self.end() {
            out.push(self.cut());
        }
        out
    }

    /// The windows left with samples in them, filled with zeros (the end of a file).
    pub fn finish(&mut self) -> Vec<(i64, Input)> {
        let mut out = Vec::new();
        while self.next < self.end() {
            let short = (self.next + self.window as i64 - self.end()).max(0) as usize;
            self.buf.extend(std::iter::repeat_n(0.0, short));
            out.push(self.cut());
        }
        out
    }

    fn cut(&mut self) -> (i64, Input) {
        let from = (self.next - self.context as i64 - self.base) as usize;
        let data = self.buf[from..from + self.context + self.window].to_vec();
        let start = self.next;
        self.next += self.hop as i64;
        // Keep only what later windows read: from the next one's context on.
        let keep_from = (self.next - self.context as i64 - self.base).max(0) as usize;
        self.buf.drain(..keep_from.min(self.buf.len()));
        self.base += keep_from as i64;
        let input = Input::Arrays(vec![(
            self.input.clone(),
            Array::f32(self.shape.clone(), data),
        )]);
        (start, input)
    }
}

/// Raw PCM bytes as samples, for feeds that stream them: whole samples only (`rest` keeps a
/// partial one for the next bytes), NaN and infinities as silence.
pub fn pcm_stream(bytes: &[u8], pcm: Pcm, rest: &mut Vec<u8>) -> Vec<f32> {
    let width = match pcm {
        Pcm::S16le => 2,
        Pcm::F32le => 4,
    };
    rest.extend_from_slice(bytes);
    let whole = rest.len() / width * width;
    let out = rest[..whole]
        .chunks_exact(width)
        .map(|b| match pcm {
            Pcm::S16le => f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0,
            Pcm::F32le => {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if v.is_finite() { v } else { 0.0 }
            }
        })
        .collect();
    rest.drain(..whole);
    out
}

fn pcm_samples(bytes: &[u8], pcm: Pcm) -> Result<Vec<f32>, EngineError> {
    let width = match pcm {
        Pcm::S16le => 2,
        Pcm::F32le => 4,
    };
    if !bytes.len().is_multiple_of(width) {
        return Err(bad(format!(
            "{pcm:?}: {} bytes is not a whole number of {width}-byte samples",
            bytes.len()
        )));
    }
    if bytes.len() / width > MAX_AUDIO_SAMPLES {
        return Err(bad(format!(
            "{pcm:?}: over the limit of {MAX_AUDIO_SAMPLES} samples"
        )));
    }
    let samples: Vec<f32> = match pcm {
        Pcm::S16le => bytes
            .chunks_exact(2)
            .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
            .collect(),
        Pcm::F32le => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    };
    if samples.iter().any(|x| !x.is_finite()) {
        return Err(bad(format!("{pcm:?}: holds NaN or infinite samples")));
    }
    Ok(samples)
}

fn wav_samples(m: &Manifest, bytes: &[u8], rate: u32) -> Result<Vec<f32>, EngineError> {
    let err = |e: hound::Error| bad(format!("wav: {e}"));
    let reader = hound::WavReader::new(Cursor::new(bytes)).map_err(err)?;
    let ws = reader.spec();
    if ws.sample_rate != rate {
        return Err(bad(format!(
            "wav: {} Hz, model `{}` takes {rate} Hz audio; resample it first",
            ws.sample_rate, m.name
        )));
    }
    let channels = usize::from(ws.channels.max(1));
    if reader.len() as usize > MAX_AUDIO_SAMPLES {
        return Err(bad(format!(
            "wav: {} samples is over the limit of {MAX_AUDIO_SAMPLES}",
            reader.len()
        )));
    }
    let samples: Vec<f32> = match (ws.sample_format, ws.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(err)?,
        (hound::SampleFormat::Int, bits @ 8..=32) => {
            let full = (1i64 << (bits - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 / full))
                .collect::<Result<_, _>>()
                .map_err(err)?
        }
        (f, b) => return Err(bad(format!("wav: {b}-bit {f:?} samples are not supported"))),
    };
    if samples.iter().any(|x| !x.is_finite()) {
        return Err(bad("wav: holds NaN or infinite samples".into()));
    }
    Ok(samples
        .chunks(channels)
        .map(|c| c.iter().sum::<f32>() / c.len() as f32)
        .collect())
}

fn bad(message: String) -> EngineError {
    EngineError::Input { message }
}

/// A file's bytes, never more than `max_bytes` of them even if it grows while being read.
pub fn read_bounded(path: &Path, max_bytes: u64) -> Result<Vec<u8>, EngineError> {
    let unreadable = |e: std::io::Error| EngineError::Unreadable {
        message: format!("{}: {e}", path.display()),
    };
    let too_big = |what: String| EngineError::Input {
        message: format!("{}: {what}", path.display()),
    };
    let len = std::fs::metadata(path).map_err(unreadable)?.len();
    if len > max_bytes {
        return Err(too_big(format!(
            "{len} bytes is over the limit of {max_bytes}"
        )));
    }
    let mut bytes = Vec::with_capacity(len.min(max_bytes) as usize);
    std::fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_end(&mut std::io::Read::take(f, max_bytes + 1), &mut bytes)
        })
        .map_err(unreadable)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_big(format!(
            "grew past the limit of {max_bytes} bytes while being read"
        )));
    }
    Ok(bytes)
}

/// The one input a bare tensor goes to.
fn only_fed(m: &Manifest) -> Result<(usize, &InputSpec), EngineError> {
    let spec = m.primary().ok_or_else(|| {
        let names: Vec<_> = m.fed().map(|s| s.name.as_str()).collect();
        bad(format!(
            "model `{}` takes several inputs ({}); give them by name in an .npz",
            m.name,
            names.join(", ")
        ))
    })?;
    let ix = m.inputs.iter().position(|i| i.name == spec.name);
    Ok((ix.expect("the primary input is an input"), spec))
}

/// The full shape a given array has as this input: the batch may be left out; named
/// dimensions take their value from it, within their bounds and equal wherever a name recurs.
pub fn fit_shape(
    m: &Manifest,
    spec: &InputSpec,
    given: &[usize],
    named: &mut HashMap<String, usize>,
) -> Result<Vec<usize>, EngineError> {
    let decl = &spec.shape;
    // A named batch is tern's to fill (crops run together): a caller sends one sample.
    let batch = m.batch().filter(|_| spec.image.is_some());
    let one_first = decl.first() == Some(&Dim::Fixed(1)) || batch.is_some();
    let full: Vec<usize> = if given.len() + 1 == decl.len() && one_first {
        std::iter::once(1).chain(given.iter().copied()).collect()
    } else {
        given.to_vec()
    };
    let shown: Vec<String> = decl.iter().map(|d| d.to_string()).collect();
    // The batch may be left out, so both forms are what the input takes.
    let takes = match one_first {
        true => format!("[{}] (or [{}])", shown.join(", "), shown[1..].join(", ")),
        false => format!("[{}]", shown.join(", ")),
    };
    let misfit = |why: String| {
        bad(format!(
            "shape {given:?} does not fit input `{}` of model `{}`, which takes {takes}{why}",
            spec.name, m.name,
        ))
    };
    if full.len() != decl.len() {
        return Err(misfit(String::new()));
    }
    if let Some(b) = batch
        && full[0] != 1
    {
        return Err(misfit(format!(
            ": `{b}` is {}, but one request is one sample",
            full[0]
        )));
    }
    for (d, n) in decl.iter().zip(&full) {
        match d {
            Dim::Fixed(f) if f != n => return Err(misfit(String::new())),
            Dim::Fixed(_) => {}
            Dim::Named { name, max } => {
                if *n == 0 || n > max {
                    return Err(misfit(format!(": `{name}` is {n}, outside 1..={max}")));
                }
                // What images become, tensors must be too: a side `fit` never makes would
                // only cost a plan.
                if let Some(image) = spec.image.as_ref().filter(|i| i.resize == Resize::Fit)
                    && batch != Some(name.as_str())
                    && n % image.multiple != 0
                {
                    return Err(misfit(format!(
                        ": `{name}` is {n}, not a multiple of {}",
                        image.multiple
                    )));
                }
                if let Some(prev) = named.insert(name.clone(), *n)
                    && prev != *n
                {
                    return Err(misfit(format!(
                        ": `{name}` is {n} here and {prev} in another input"
                    )));
                }
            }
        }
    }
    Ok(full)
}

fn image_spec(m: &Manifest) -> Option<(usize, &InputSpec, &ImageSpec)> {
    m.inputs
        .iter()
        .enumerate()
        .find_map(|(ix, i)| i.image.as_ref().map(|p| (ix, i, p)))
}

/// The (height, width) an image of `w`×`h` is brought to for this input.
fn target_size(spec: &InputSpec, pre: &ImageSpec, w: u32, h: u32) -> (usize, usize) {
    let (hd, wd) = match pre.layout {
        Layout::Nchw => (&spec.shape[2], &spec.shape[3]),
        Layout::Nhwc => (&spec.shape[1], &spec.shape[2]),
        Layout::Nc => {
            let f = match spec.shape[1] {
                Dim::Fixed(n) => n,
                Dim::Named { .. } => 0,
            };
            return pre.nc_side_size(f).unwrap_or((0, 0));
        }
    };
    let (w, h) = (f64::from(w.max(1)), f64::from(h.max(1)));
    let bound = |d: &Dim| match d {
        Dim::Fixed(n) => *n,
        Dim::Named { max, .. } => *max,
    };
    let scale = match (hd, wd) {
        (Dim::Fixed(fh), Dim::Fixed(fw)) => return (*fh, *fw),
        (Dim::Fixed(fh), _) => *fh as f64 / h,
        (_, Dim::Fixed(fw)) => *fw as f64 / w,
        _ => 1f64.min(bound(hd) as f64 / h).min(bound(wd) as f64 / w),
    };
    let side = |d: &Dim, v: f64| match d {
        Dim::Fixed(n) => *n,
        Dim::Named { max, .. } => {
            let m = pre.multiple;
            let rounded = ((v * scale / m as f64).round() as usize).max(1) * m;
            // The bound wins over the multiple: a side is never over its bound.
            let cap = if *max >= m { max / m * m } else { *max };
            rounded.min(cap)
        }
    };
    (side(hd, h), side(wd, w))
}

/// The image scaled to fit `w`×`h` with its aspect ratio kept, centred on a canvas of the pad
/// value, and the transform that maps model pixels back to it.
fn letterbox(img: DynamicImage, (w, h): (u32, u32), pre: &ImageSpec) -> (DynamicImage, Geometry) {
    let (iw, ih) = (img.width().max(1), img.height().max(1));
    let scale = (w as f32 / iw as f32).min(h as f32 / ih as f32);
    let nw = ((iw as f32 * scale).round() as u32).clamp(1, w);
    let nh = ((ih as f32 * scale).round() as u32).clamp(1, h);
    let (left, top) = ((w - nw) / 2, (h - nh) / 2);
    let small = img.resize_exact(nw, nh, filter(pre.filter));
    let canvas = match pre.color {
        Color::Gray => {
            let mut c = image::GrayImage::from_pixel(w, h, image::Luma([pre.pad]));
            image::imageops::overlay(&mut c, &small.into_luma8(), left.into(), top.into());
            DynamicImage::ImageLuma8(c)
        }
        Color::Rgb | Color::Bgr => {
            let mut c = image::RgbImage::from_pixel(w, h, image::Rgb([pre.pad; 3]));
            image::imageops::overlay(&mut c, &small.into_rgb8(), left.into(), top.into());
            DynamicImage::ImageRgb8(c)
        }
    };
    let g = Geometry {
        width: iw,
        height: ih,
        model_width: w,
        model_height: h,
        scale_x: nw as f32 / iw as f32,
        scale_y: nh as f32 / ih as f32,
        pad_left: left as f32,
        pad_top: top as f32,
    };
    (canvas, g)
}

fn image_input(m: &Manifest, img: DynamicImage) -> Result<Prepared, EngineError> {
    let Some((ix, spec, pre)) = image_spec(m) else {
        return Err(bad(format!(
            "model `{}` takes tensors, not images (its manifest declares no image input)",
            m.name
        )));
    };
    let (width, height) = (img.width(), img.height());
    let (h, w) = target_size(spec, pre, width, height);
    let mut geometry = Geometry::stretch(width, height, w as u32, h as u32);
    let img = if width as usize == w && height as usize == h {
        img
    } else if pre.resize == Resize::Letterbox {
        let (img, g) = letterbox(img, (w as u32, h as u32), pre);
        geometry = g;
        img
    } else if pre.resize != Resize::None {
        img.resize_exact(w as u32, h as u32, filter(pre.filter))
    } else {
        return Err(bad(format!(
            "image is {width}x{height}, model `{}` takes {w}x{h} and its manifest does not resize",
            m.name
        )));
    };
    let pixels: Vec<u8> = match pre.color {
        Color::Gray => img.into_luma8().into_raw(),
        Color::Rgb | Color::Bgr => img.into_rgb8().into_raw(),
    };
    let mut named = HashMap::new();
    if let Some(b) = m.batch() {
        named.insert(b.to_string(), 1);
    }
    let sides = match pre.layout {
        Layout::Nchw => [(&spec.shape[2], h), (&spec.shape[3], w)],
        Layout::Nhwc => [(&spec.shape[1], h), (&spec.shape[2], w)],
        // A flattened image has no sides of its own to name.
        Layout::Nc => [(&spec.shape[0], 1), (&spec.shape[0], 1)],
    };
    for (d, v) in sides {
        if let Dim::Named { name, .. } = d {
            named.insert(name.clone(), v);
        }
    }
    let shape = spec.concrete_shape(&named);
    let mut out = vec![0f32; shape.iter().product()];
    if out.len() != pixels.len() {
        return Err(bad(format!(
            "a {w}x{h} {:?} image gives {} values, model `{}` takes shape {shape:?}",
            pre.color,
            pixels.len(),
            m.name
        )));
    }
    pixels_into(pre, (h, w), &pixels, &mut out);
    Ok(Prepared {
        arrays: vec![(ix, Array::f32(shape, out))],
        geometry: Some(geometry),
    })
}

/// What a JSON tensor read so far says.
#[derive(Default)]
struct JsonTensor {
    /// The length of the arrays at each depth, once the first one there has ended (the first
    /// array at a depth to start is the first to end: arrays at one depth never nest).
    lens: Vec<Option<usize>>,
    /// The depth the numbers are at, once one was seen.
    leaf: Option<usize>,
    data: Vec<f32>,
}

/// Reads the value at `depth` into a [`JsonTensor`].
struct JsonAt<'a> {
    depth: usize,
    acc: &'a mut JsonTensor,
}

fn ragged<E: serde::de::Error>(depth: usize) -> E {
    E::custom(format!("ragged array at depth {depth}: not a tensor"))
}

impl<'de> serde::de::DeserializeSeed<'de> for JsonAt<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl JsonAt<'_> {
    fn number<E: serde::de::Error>(self, x: f64) -> Result<(), E> {
        match self.acc.leaf {
            // An array went deeper than this number.
            None if self.acc.lens.len() > self.depth => return Err(ragged(self.depth)),
            None => self.acc.leaf = Some(self.depth),
            Some(l) if l != self.depth => return Err(ragged(self.depth)),
            Some(_) => {}
        }
        if self.acc.data.len() == MAX_TENSOR_ELEMENTS {
            return Err(E::custom(format!(
                "more than {MAX_TENSOR_ELEMENTS} elements"
            )));
        }
        self.acc.data.push(x as f32);
        Ok(())
    }
}

impl<'de> serde::de::Visitor<'de> for JsonAt<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number or an array of them")
    }
    fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<(), E> {
        self.number(x)
    }
    fn visit_i64<E: serde::de::Error>(self, x: i64) -> Result<(), E> {
        self.number(x as f64)
    }
    fn visit_u64<E: serde::de::Error>(self, x: u64) -> Result<(), E> {
        self.number(x as f64)
    }
    /// Read to its end first, so that a cut-off object is "not JSON", like any cut-off text.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::{Error as _, IgnoredAny};
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Err(A::Error::custom(
            "expected a number or an array of them, found an object",
        ))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth;
        if self.acc.leaf.is_some_and(|l| depth >= l) {
            return Err(ragged(depth));
        }
        if self.acc.lens.len() <= depth {
            self.acc.lens.resize(depth + 1, None);
        }
        let want = self.acc.lens[depth];
        let mut n = 0usize;
        while seq
            .next_element_seed(JsonAt {
                depth: depth + 1,
                acc: &mut *self.acc,
            })?
            .is_some()
        {
            n += 1;
            if want.is_some_and(|w| n > w) {
                return Err(ragged(depth));
            }
        }
        match want {
            None => self.acc.lens[depth] = Some(n),
            Some(w) if w != n => return Err(ragged(depth)),
            Some(_) => {}
        }
        Ok(())
    }
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

/// Interleaved 8-bit RGB (or gray) pixels of the model's size into the input layout, in the
/// model's channel order, scaled and normalised.
fn pixels_into(pre: &ImageSpec, (h, w): (usize, usize), pixels: &[u8], out: &mut [f32]) {
    let c = pre.color.channels();
    debug_assert_eq!(pixels.len(), h * w * c);
    let per_channel = |v: &[f32], ch: usize, default: f32| match v.len() {
        0 => default,
        1 => v[0],
        _ => v[ch],
    };
    // Fold scale, mean and std into one multiply-add per value; `src[ch]` is the pixel
    // channel the model's channel `ch` reads.
    let mut mul = [0f32; 3];
    let mut add = [0f32; 3];
    let mut src = [0usize, 1, 2];
    if pre.color == Color::Bgr {
        src = [2, 1, 0];
    }
    for ch in 0..c {
        let inv_std = 1.0 / per_channel(&pre.std, ch, 1.0);
        mul[ch] = pre.scale * inv_std;
        add[ch] = -per_channel(&pre.mean, ch, 0.0) * inv_std;
    }
    match pre.layout {
        Layout::Nhwc | Layout::Nc => {
            for (d, p) in out.chunks_exact_mut(c).zip(pixels.chunks_exact(c)) {
                for ch in 0..c {
                    d[ch] = p[src[ch]] as f32 * mul[ch] + add[ch];
                }
            }
        }
        Layout::Nchw => {
            let plane_len = out.len() / c;
            for (ch, plane) in out.chunks_exact_mut(plane_len).enumerate() {
                for (d, p) in plane.iter_mut().zip(pixels.iter().skip(src[ch]).step_by(c)) {
                    *d = *p as f32 * mul[ch] + add[ch];
                }
            }
        }
    }
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

    #[test]
    fn json_tensors_read_to_their_shape_and_ragged_ones_are_refused() {
        let ok = |j: &str| match Input::from_json(j.as_bytes()) {
            Ok(Input::Tensor { shape, data }) => (shape, data),
            other => panic!("{j}: {other:?}"),
        };
        assert_eq!(ok("2.5"), (vec![], vec![2.5]));
        assert_eq!(ok("[]"), (vec![0], vec![]));
        assert_eq!(ok("[[], []]"), (vec![2, 0], vec![]));
        assert_eq!(
            ok(" [[1, 2, 3], [4, 5, -6e0]] "),
            (vec![2, 3], vec![1., 2., 3., 4., 5., -6.])
        );
        assert_eq!(ok("[[[7]]]"), (vec![1, 1, 1], vec![7.]));
        let err = |j: &str| match Input::from_json(j.as_bytes()) {
            Err(EngineError::Input { message }) => message,
            other => panic!("{j}: {other:?}"),
        };
        for j in [
            "[[1, 2], [3]]",
            "[[1], [2, 3]]",
            "[[1, 2], 3]",
            "[1, [2]]",
            "[[], [1]]",
            "[[1], []]",
            "[[[1]], [2]]",
        ] {
            assert!(err(j).contains("ragged array"), "{j}: {}", err(j));
        }
        assert!(err("[1, \"x\"]").contains("expected a number"));
        assert!(err("[1, null]").contains("expected a number"));
        assert!(err("{\"a\": 1}").contains("expected a number"));
        assert!(err("[1, 2").starts_with("not JSON"));
        assert!(err("{").starts_with("not JSON"), "{}", err("{"));
        assert!(err("[{\"a\": [1, 2], \"b\": {}}]").contains("found an object"));
        assert!(err("[1] [2]").starts_with("not JSON"));
    }

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
        assert_eq!(t.arrays[0].1.shape, [1, 3, 2, 4]);
        let want: Vec<f32> = (0..3)
            .flat_map(|c| (0..8).map(move |i| (c * 100 + i) as f32))
            .collect();
        assert_eq!(t.arrays[0].1.data, Data::F32(want));
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

#[cfg(test)]
mod v2_tests {
    use super::*;

    fn rec(color: &str) -> Manifest {
        Manifest::parse(&format!(
            r#"
format = 2
name = "rec"
version = "1.0.0"
[[inputs]]
name = "x"
dtype = "f32"
shape = [1, 3, 4, "W<=20"]
[inputs.image]
layout = "nchw"
color = "{color}"
resize = "fit"
multiple = 4
[[outputs]]
name = "y"
[outputs.postprocess]
kind = "raw"
[selftest]
tolerance = 0.0
golden = ["g.npz"]
"#
        ))
        .unwrap()
    }

    fn frame(width: u32, height: u32) -> Input {
        // Pixel (x, y) is (x, y, 200) in R, G, B.
        let data = (0..height)
            .flat_map(|y| (0..width).flat_map(move |x| [x as u8, y as u8, 200]))
            .collect();
        Input::Frame {
            width,
            height,
            format: PixelFormat::Rgb24,
            data,
        }
    }

    #[test]
    fn fit_follows_the_aspect_ratio_within_the_bound() {
        let m = rec("rgb");
        // 2 high, 5 wide → height 4 (x2), width 10 rounded to 12 (multiple of 4).
        let p = frame(5, 2).prepare(&m).unwrap();
        assert_eq!(p.arrays[0].1.shape, [1, 3, 4, 12]);
        assert_eq!(p.geometry.map(|g| (g.width, g.model_width)), Some((5, 12)));
        // 1 high, 30 wide would be 120 wide: held to the bound, 20.
        let p = frame(30, 1).prepare(&m).unwrap();
        assert_eq!(p.arrays[0].1.shape, [1, 3, 4, 20]);
    }

    #[test]
    fn bgr_puts_blue_first() {
        let (rgb, bgr) = (rec("rgb"), rec("bgr"));
        let first = |m: &Manifest| match &frame(4, 4).prepare(m).unwrap().arrays[0].1.data {
            Data::F32(v) => v[0],
            other => panic!("{other:?}"),
        };
        assert_eq!(first(&rgb), 0.0, "red of pixel (0, 0)");
        assert_eq!(first(&bgr), 200.0, "blue of pixel (0, 0)");
    }

    #[test]
    fn named_arrays_are_checked_against_the_inputs() {
        let m = rec("rgb");
        let arrays = |name: &str, shape: Vec<usize>| {
            let n = shape.iter().product();
            Input::Arrays(vec![(name.into(), Array::f32(shape, vec![0.5; n]))])
        };
        let p = arrays("in/x", vec![1, 3, 4, 8]).prepare(&m).unwrap();
        assert_eq!(p.arrays[0].1.shape, [1, 3, 4, 8]);
        for (input, want) in [
            (arrays("z", vec![1, 3, 4, 8]), "`z` is not an input"),
            (arrays("x", vec![1, 3, 4, 24]), "outside 1..=20"),
            (arrays("x", vec![1, 3, 5, 8]), "does not fit input `x`"),
        ] {
            let e = input.prepare(&m).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let twice = Input::Arrays(vec![
            ("x".into(), Array::f32(vec![1, 3, 4, 8], vec![0.5; 96])),
            ("in/x".into(), Array::f32(vec![1, 3, 4, 8], vec![0.5; 96])),
        ]);
        let e = twice.prepare(&m).unwrap_err().to_string();
        assert!(e.contains("two arrays for input `x`"), "{e}");
        // A width fit never makes (not a multiple of 4) is refused before it costs a plan.
        let e = arrays("x", vec![1, 3, 4, 6])
            .prepare(&m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a multiple of 4"), "{e}");
        let ints = Input::Arrays(vec![(
            "x".into(),
            Array {
                shape: vec![1, 3, 4, 8],
                data: Data::I64(vec![0; 96]),
            },
        )]);
        let e = ints.prepare(&m).unwrap_err().to_string();
        assert!(e.contains("takes f32, the array is i64"), "{e}");
    }
}

/// A small streaming model's manifest for tests: audio windows of 4 new samples after 2 of
/// context at `rate`, one score output.
#[cfg(test)]
pub(crate) fn vad_manifest(rate: u32) -> Manifest {
    Manifest::parse(&format!(
        r#"
format = 2
name = "vad"
version = "1.0.0"
[[inputs]]
name = "input"
dtype = "f32"
shape = [1, 6]
[inputs.audio]
sample_rate = {rate}
window = 4
context = 2
[[outputs]]
name = "p"
[outputs.postprocess]
kind = "score"
[selftest]
tolerance = 0.0
golden = ["g.npz"]
"#
    ))
    .unwrap()
}

#[cfg(test)]
mod audio_tests {
    use super::*;

    fn vad() -> Manifest {
        vad_manifest(8000)
    }

    fn window(i: &Input) -> Vec<f32> {
        match i {
            Input::Arrays(a) => match &a[0].1.data {
                Data::F32(v) => v.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pcm_is_cut_into_windows_with_context() {
        // Samples 1..=10 as s16le (value k is k / 32768).
        let bytes: Vec<u8> = (1..=10i16).flat_map(|k| k.to_le_bytes()).collect();
        let w = audio_windows(&vad(), &bytes, Some(Pcm::S16le)).unwrap();
        let as_ints = |v: Vec<f32>| {
            v.iter()
                .map(|x| (x * 32768.0).round() as i32)
                .collect::<Vec<_>>()
        };
        assert_eq!(w.len(), 3, "10 samples in windows of 4");
        assert_eq!(w[1].0, 4.0 / 8000.0);
        assert_eq!(as_ints(window(&w[0].1)), [0, 0, 1, 2, 3, 4]);
        assert_eq!(as_ints(window(&w[1].1)), [3, 4, 5, 6, 7, 8]);
        assert_eq!(as_ints(window(&w[2].1)), [7, 8, 9, 10, 0, 0]);
        let e = audio_windows(&vad(), &bytes[..3], Some(Pcm::S16le)).unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
        let e = audio_windows(&vad(), &bytes, None).unwrap_err();
        assert!(e.to_string().contains("wav"), "{e}");
    }

    #[test]
    fn a_stream_in_any_pieces_is_cut_as_a_whole_and_hops_may_overlap() {
        let samples: Vec<f32> = (1..=13).map(|k| k as f32).collect();
        let whole: Vec<(i64, Vec<f32>)> = Windower::for_model(&vad(), None)
            .unwrap()
            .push(&samples)
            .into_iter()
            .map(|(s, i)| (s, window(&i)))
            .collect();
        assert_eq!(
            whole,
            [
                (0, vec![0., 0., 1., 2., 3., 4.]),
                (4, vec![3., 4., 5., 6., 7., 8.]),
                (8, vec![7., 8., 9., 10., 11., 12.])
            ]
        );
        for piece in 1..=5 {
            let mut w = Windower::for_model(&vad(), None).unwrap();
            let got: Vec<(i64, Vec<f32>)> = samples
                .chunks(piece)
                .flat_map(|c| w.push(c))
                .map(|(s, i)| (s, window(&i)))
                .collect();
            assert_eq!(got, whole, "pieces of {piece}");
            assert_eq!(w.end(), 13);
        }
        // A hop of 2: windows overlap; after a reset the stream starts again at 0.
        let mut w = Windower::for_model(&vad(), Some(2)).unwrap();
        let got: Vec<i64> = w.push(&samples[..8]).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, [0, 2, 4]);
        w.reset();
        let again = w.push(&samples[..4]);
        assert_eq!(again.len(), 1);
        assert_eq!(window(&again[0].1), [0., 0., 1., 2., 3., 4.]);

        // Bytes split mid-sample come out whole; a NaN float is silence.
        let bytes: Vec<u8> = [1000i16, -2000, 3000]
            .iter()
            .flat_map(|k| k.to_le_bytes())
            .collect();
        let mut rest = Vec::new();
        let mut got = pcm_stream(&bytes[..3], Pcm::S16le, &mut rest);
        got.extend(pcm_stream(&bytes[3..], Pcm::S16le, &mut rest));
        let ints: Vec<i32> = got.iter().map(|x| (x * 32768.0).round() as i32).collect();
        assert_eq!(ints, [1000, -2000, 3000]);
        assert!(rest.is_empty());
        let nan = f32::NAN.to_le_bytes();
        assert_eq!(pcm_stream(&nan, Pcm::F32le, &mut rest), [0.0]);
    }
}
