//! ONNX Runtime as a plan: `libonnxruntime.so` loaded at run time (the `ort` crate's
//! load-dynamic), so nothing is downloaded at build time and a box without the library runs
//! tract's plans alone.
//!
//! The library is looked for in `engine.onnxruntime_library`, then `ORT_DYLIB_PATH`, then the
//! system's library path, then an installed `onnxruntime` Python wheel.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::value::{DynValue, Tensor, ValueType};

use super::array::{Array, Data};

/// The configured library (`engine.onnxruntime_library`), set once before any model loads.
static CONFIGURED: OnceLock<PathBuf> = OnceLock::new();
/// The loaded library and its environment, or why there is none; decided once per process.
static ENVIRONMENT: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> =
    OnceLock::new();

/// Use this library file (from the configuration); ignored once a model has loaded.
pub fn configure(path: PathBuf) {
    let _ = CONFIGURED.set(path);
}

/// The library in use, loading it on first call; the error says where it looked.
pub fn library() -> Result<&'static Path, String> {
    environment().map(|(_, p)| p.as_path())
}

fn environment() -> Result<&'static (ort::environment::Environment, PathBuf), String> {
    ENVIRONMENT
        .get_or_init(|| {
            let mut tried = Vec::new();
            // The Python wheel is asked for (a process) only when nothing else loads.
            let candidates = candidates()
                .into_iter()
                .map(Some)
                .chain(std::iter::once(None));
            for candidate in candidates {
                let candidate = match candidate {
                    Some(c) => c,
                    None if CONFIGURED.get().is_some() => break,
                    None => match python_wheel() {
                        Some(c) => c,
                        None => break,
                    },
                };
                // A panic in a foreign loader must not take the daemon down.
                let loaded = std::panic::catch_unwind(|| {
                    ort::init_from(&candidate)
                        .map_err(|e| e.to_string())
                        .and_then(|b| b.with_name("ternd").build().map_err(|e| e.to_string()))
                });
                match loaded {
                    Ok(Ok(env)) => return Ok((env, candidate)),
                    Ok(Err(e)) => tried.push(format!("{}: {e}", candidate.display())),
                    Err(_) => tried.push(format!("{}: the loader panicked", candidate.display())),
                }
            }
            // Decided once per process: a library installed later is used after a restart.
            Err(format!(
                "no ONNX Runtime library could be loaded (set engine.onnxruntime_library or \
                 ORT_DYLIB_PATH, or `pip install onnxruntime`; restart after installing one); \
                 tried: {}",
                if tried.is_empty() {
                    "nothing".into()
                } else {
                    tried.join("; ")
                }
            ))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Where the library may be, in order, before asking Python.
fn candidates() -> Vec<PathBuf> {
    if let Some(p) = CONFIGURED.get() {
        // What the operator configured is the only answer: no guessing around it.
        return vec![p.clone()];
    }
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    out.push(PathBuf::from("libonnxruntime.so"));
    out
}

/// `libonnxruntime.so*` inside an installed `onnxruntime` Python package, if python3 has one
/// and says so within a few seconds (a python3 that hangs must not hold every model load).
fn python_wheel() -> Option<PathBuf> {
    use std::io::Read;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util, os; s = importlib.util.find_spec('onnxruntime'); \
             print(os.path.join(os.path.dirname(s.origin), 'capi') if s else '')",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut text = String::new();
    child.stdout.take()?.read_to_string(&mut text).ok()?;
    let dir = PathBuf::from(text.trim());
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
        })
        .collect();
    // The versioned file (libonnxruntime.so.1.32.0) over a bare link, if both are there.
    libs.sort();
    libs.pop()
}

/// One model in ONNX Runtime: a session per pool worker, since `Session::run` takes `&mut`
/// (each with the pool's intra-op threads), so workers do not queue behind one another.
pub struct OrtPlan {
    sessions: Vec<Mutex<Session>>,
}

impl OrtPlan {
    pub fn load(model: &Path, threads: usize, workers: usize) -> Result<OrtPlan, String> {
        let (env, _) = environment()?;
        let s = |e: ort::Error<ort::session::builder::SessionBuilder>| e.to_string();
        let sessions = (0..workers.max(1))
            .map(|_| {
                Session::builder(env)
                    .map_err(|e| e.to_string())?
                    .with_intra_threads(threads)
                    .map_err(s)?
                    .with_inter_threads(1)
                    .map_err(s)?
                    // Spinning threads would take the cores other models run on between
                    // requests.
                    .with_intra_op_spinning(false)
                    .map_err(s)?
                    .commit_from_file(model)
                    .map(Mutex::new)
                    .map_err(|e| format!("onnxruntime refused the model: {e}"))
            })
            .collect::<Result<_, String>>()?;
        Ok(OrtPlan { sessions })
    }

    /// A free session, or the first one to wait on when every one is busy.
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        for s in &self.sessions {
            match s.try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        self.sessions[0].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run with inputs by name (`true`: the model takes the floats as f16); the named
    /// outputs, in order.
    pub fn run(
        &self,
        inputs: Vec<(String, Array, bool)>,
        outputs: &[&str],
    ) -> Result<Vec<Array>, String> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for (name, a, f16) in inputs {
            let shape: Vec<i64> = a.shape.iter().map(|d| *d as i64).collect();
            let e = |e: ort::Error| format!("input `{name}`: {e}");
            let v: DynValue = match a.data {
                Data::F32(v) if f16 => {
                    let narrow: Vec<half::f16> = v.into_iter().map(half::f16::from_f32).collect();
                    Tensor::from_array((shape, narrow)).map_err(e)?.into_dyn()
                }
                Data::F32(v) => Tensor::from_array((shape, v)).map_err(e)?.into_dyn(),
                Data::I64(v) => Tensor::from_array((shape, v)).map_err(e)?.into_dyn(),
                Data::I32(v) => Tensor::from_array((shape, v)).map_err(e)?.into_dyn(),
                Data::U8(v) => Tensor::from_array((shape, v)).map_err(e)?.into_dyn(),
                Data::Bool(v) => Tensor::from_array((shape, v)).map_err(e)?.into_dyn(),
            };
            values.push((name, v));
        }
        let mut session = self.session();
        let result = session.run(values).map_err(|e| e.to_string())?;
        outputs
            .iter()
            .map(|name| {
                let v = result
                    .get(*name)
                    .ok_or_else(|| format!("onnxruntime gave no output `{name}`"))?;
                array(name, v)
            })
            .collect()
    }
}

/// An output as tern's array (floats of any width as f32).
fn array(name: &str, v: &DynValue) -> Result<Array, String> {
    let e = |e: ort::Error| format!("output `{name}`: {e}");
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(format!("output `{name}` is not a tensor"));
    };
    use ort::value::TensorElementType as T;
    let (shape, data) = match ty {
        T::Float32 => {
            let (s, d) = v.try_extract_tensor::<f32>().map_err(e)?;
            (s.to_vec(), Data::F32(d.to_vec()))
        }
        T::Float16 => {
            let (s, d) = v.try_extract_tensor::<half::f16>().map_err(e)?;
            (
                s.to_vec(),
                Data::F32(d.iter().map(|x| x.to_f32()).collect()),
            )
        }
        T::Int64 => {
            let (s, d) = v.try_extract_tensor::<i64>().map_err(e)?;
            (s.to_vec(), Data::I64(d.to_vec()))
        }
        T::Int32 => {
            let (s, d) = v.try_extract_tensor::<i32>().map_err(e)?;
            (s.to_vec(), Data::I32(d.to_vec()))
        }
        T::Uint8 => {
            let (s, d) = v.try_extract_tensor::<u8>().map_err(e)?;
            (s.to_vec(), Data::U8(d.to_vec()))
        }
        T::Bool => {
            let (s, d) = v.try_extract_tensor::<bool>().map_err(e)?;
            (s.to_vec(), Data::Bool(d.to_vec()))
        }
        other => {
            return Err(format!(
                "output `{name}` is {other:?}, which tern does not read"
            ));
        }
    };
    Ok(Array {
        shape: shape.iter().map(|d| (*d).max(0) as usize).collect(),
        data,
    })
}
