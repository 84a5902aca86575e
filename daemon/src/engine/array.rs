//! Typed arrays as they come in and go out of models: `.npy` and `.npz` files, constants,
//! states. tract's own tensors stay in `model.rs`.

use std::io::{Cursor, Read};

use super::EngineError;
use super::manifest::DType;

/// Largest number of elements in one array.
pub const MAX_TENSOR_ELEMENTS: usize = 64 * 1024 * 1024;
/// Most bytes an `.npz` may inflate to, all members together: a small deflated file must not
/// take a box's memory.
const MAX_NPZ_BYTES: u64 = 128 * 1024 * 1024;
/// Largest number of arrays in one `.npz`.
const MAX_NPZ_MEMBERS: usize = 256;

/// Values of one dtype, row-major. `f16` arrays are held as `F32` and narrowed where the
/// model takes them.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a model input of `dtype` takes these values as they are.
    pub fn fits(&self, dtype: DType) -> bool {
        matches!(
            (self, dtype),
            (Data::F32(_), DType::F32 | DType::F16)
                | (Data::I64(_), DType::I64)
                | (Data::I32(_), DType::I32)
                | (Data::U8(_), DType::U8)
                | (Data::Bool(_), DType::Bool)
        )
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            Data::F32(_) => "f32",
            Data::I64(_) => "i64",
            Data::I32(_) => "i32",
            Data::U8(_) => "u8",
            Data::Bool(_) => "bool",
        }
    }

    /// Every value as f32, for comparing and postprocessing.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Data::F32(v) => v.clone(),
            Data::I64(v) => v.iter().map(|x| *x as f32).collect(),
            Data::I32(v) => v.iter().map(|x| *x as f32).collect(),
            Data::U8(v) => v.iter().map(|x| *x as f32).collect(),
            Data::Bool(v) => v.iter().map(|x| f32::from(u8::from(*x))).collect(),
        }
    }
}

impl Array {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Array {
        Array {
            shape,
            data: Data::F32(data),
        }
    }
}

fn bad(message: String) -> EngineError {
    EngineError::Input { message }
}

/// A little-endian, C-order `.npy` of f32, f16, i64, i32, u8 or bool.
pub fn read_npy(bytes: &[u8]) -> Result<Array, EngineError> {
    let err = |m: String| bad(format!("npy: {m}"));
    let npy = npyz::NpyFile::new(bytes).map_err(|e| err(e.to_string()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|d| *d as usize).collect();
    let count = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
    match count {
        Some(n) if n <= MAX_TENSOR_ELEMENTS => {}
        _ => return Err(err(format!("shape {shape:?} is too large"))),
    }
    if npy.order() != npyz::Order::C {
        return Err(err("Fortran-order arrays are not supported".into()));
    }
    let dtype = npy.dtype();
    let npyz::DType::Plain(t) = &dtype else {
        return Err(err(format!(
            "dtype {} is not a plain number",
            dtype.descr()
        )));
    };
    let little = t.endianness() != npyz::Endianness::Big;
    let e = |e: std::io::Error| err(e.to_string());
    use npyz::TypeChar::*;
    let data = match (t.type_char(), t.size_field(), little) {
        (Float, 4, true) => Data::F32(npy.into_vec::<f32>().map_err(e)?),
        (Float, 2, true) => Data::F32(
            npy.into_vec::<half::f16>()
                .map_err(e)?
                .into_iter()
                .map(f32::from)
                .collect(),
        ),
        (Int, 8, true) => Data::I64(npy.into_vec::<i64>().map_err(e)?),
        (Int, 4, true) => Data::I32(npy.into_vec::<i32>().map_err(e)?),
        (Uint, 1, _) => Data::U8(npy.into_vec::<u8>().map_err(e)?),
        (Bool, 1, _) => Data::Bool(npy.into_vec::<bool>().map_err(e)?),
        _ => {
            return Err(err(format!(
                "dtype {} is not one tern takes (<f4, <f2, <i8, <i4, |u1, |b1)",
                dtype.descr()
            )));
        }
    };
    Ok(Array { shape, data })
}

/// A float32 `.npy` (format 1's golden vectors and tensor inputs).
pub fn read_npy_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), EngineError> {
    let a = read_npy(bytes)?;
    match a.data {
        Data::F32(v) => Ok((a.shape, v)),
        other => Err(bad(format!(
            "npy: dtype {} is not float32 (<f4)",
            other.dtype_name()
        ))),
    }
}

/// Every array of an `.npz` (numpy's `savez`, stored or deflated), by name, in archive order.
/// Sizes are checked before anything is inflated.
pub fn read_npz(bytes: &[u8]) -> Result<Vec<(String, Array)>, EngineError> {
    let err = |m: String| bad(format!("npz: {m}"));
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| err(e.to_string()))?;
    if zip.len() > MAX_NPZ_MEMBERS {
        return Err(err(format!(
            "{} arrays; at most {MAX_NPZ_MEMBERS}",
            zip.len()
        )));
    }
    let mut out = Vec::with_capacity(zip.len());
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(|e| err(e.to_string()))?;
        let Some(name) = f.name().strip_suffix(".npy").map(str::to_string) else {
            return Err(err(format!("member `{}` is not a .npy", f.name())));
        };
        // A member may claim any size: count what it inflates to, not what it says.
        let limit = MAX_NPZ_BYTES.saturating_sub(total);
        let mut buf = Vec::new();
        (&mut f)
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| err(format!("{name}: {e}")))?;
        if buf.len() as u64 > limit {
            return Err(err(format!("{name}: the archive holds too much data")));
        }
        total += buf.len() as u64;
        let a = read_npy(&buf).map_err(|e| err(format!("{name}: {e}")))?;
        out.push((name, a));
    }
    Ok(out)
}

/// A golden case as a folder: every `.npy` under it, named by its path without `.npy`
/// (`in/x.npy` is `in/x`, `out/a/b.npy` is `out/a/b`), as in an `.npz`. Symbolic links are
/// not followed: a package's files stay inside it.
pub fn read_npy_tree(dir: &std::path::Path) -> Result<Vec<(String, Array)>, EngineError> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut Vec<(String, Array)>,
    ) -> Result<(), EngineError> {
        let err = |e: std::io::Error| bad(format!("{}: {e}", dir.display()));
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let kind = e.file_type().map_err(err)?;
            let path = e.path();
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() && path.extension().is_some_and(|x| x == "npy") {
                if out.len() >= MAX_NPZ_MEMBERS {
                    return Err(bad(format!("more than {MAX_NPZ_MEMBERS} arrays")));
                }
                let name = path
                    .strip_prefix(root)
                    .expect("walked from the root")
                    .with_extension("")
                    .to_string_lossy()
                    .to_string();
                let bytes = std::fs::read(&path).map_err(err)?;
                let a = read_npy(&bytes).map_err(|e| bad(format!("{name}: {e}")))?;
                out.push((name, a));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// Write arrays as an uncompressed `.npz` (numpy reads it with `np.load`), through a temporary
/// file renamed into place.
pub fn write_npz(path: &std::path::Path, arrays: &[(String, Array)]) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    use std::io::Write;
    let io = |e: zip::result::ZipError| std::io::Error::other(e.to_string());
    let tmp = path.with_extension("npz.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    for (name, a) in arrays {
        let mut npy = Vec::new();
        let shape: Vec<u64> = a.shape.iter().map(|d| *d as u64).collect();
        macro_rules! put {
            ($v:expr) => {{
                let mut w = npyz::WriteOptions::new()
                    .default_dtype()
                    .shape(&shape)
                    .writer(&mut npy)
                    .begin_nd()?;
                w.extend($v.iter().copied())?;
                w.finish()?;
            }};
        }
        match &a.data {
            Data::F32(v) => put!(v),
            Data::I64(v) => put!(v),
            Data::I32(v) => put!(v),
            Data::U8(v) => put!(v),
            Data::Bool(v) => put!(v),
        }
        zip.start_file(format!("{name}.npy"), options).map_err(io)?;
        zip.write_all(&npy)?;
    }
    zip.finish().map_err(io)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `.npy` of `<i8` values written by hand, as numpy lays it out.
    fn npy_i64(shape: &[usize], v: &[i64]) -> Vec<u8> {
        use npyz::WriterBuilder;
        let mut out = Vec::new();
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape.iter().map(|d| *d as u64).collect::<Vec<_>>())
            .writer(&mut out)
            .begin_nd()
            .unwrap();
        w.extend(v.iter().copied()).unwrap();
        w.finish().unwrap();
        out
    }

    #[test]
    fn npy_keeps_dtypes_and_refuses_others() {
        let a = read_npy(&npy_i64(&[2], &[16000, -1])).unwrap();
        assert_eq!(a.shape, [2]);
        assert_eq!(a.data, Data::I64(vec![16000, -1]));
        assert!(a.data.fits(DType::I64) && !a.data.fits(DType::F32));
        let e = read_npy_f32(&npy_i64(&[1], &[1])).unwrap_err();
        assert!(e.to_string().contains("not float32"), "{e}");
        assert!(read_npy(b"not an npy").is_err());
    }

    #[test]
    fn npz_members_are_named_and_bounded() {
        let mut buf = Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let o = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file("in/x.npy", o).unwrap();
            std::io::Write::write_all(&mut z, &npy_i64(&[1], &[7])).unwrap();
            z.start_file("out/a/b.npy", o).unwrap();
            std::io::Write::write_all(&mut z, &npy_i64(&[2], &[1, 2])).unwrap();
            z.finish().unwrap();
        }
        let arrays = read_npz(buf.get_ref()).unwrap();
        let names: Vec<_> = arrays.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["in/x", "out/a/b"]);
        assert_eq!(arrays[1].1.data, Data::I64(vec![1, 2]));
        // What tern writes, it reads back the same.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("g.npz");
        let mut mixed = arrays.clone();
        mixed.push(("in/f".into(), Array::f32(vec![2, 1], vec![0.5, -1.0])));
        mixed.push((
            "in/b".into(),
            Array {
                shape: vec![],
                data: Data::Bool(vec![true]),
            },
        ));
        write_npz(&p, &mixed).unwrap();
        assert_eq!(read_npz(&std::fs::read(&p).unwrap()).unwrap(), mixed);
        let e = read_npz(b"PK\x03\x04 truncated").unwrap_err();
        assert!(e.to_string().contains("npz"), "{e}");
    }
}
