//! The artifact of a model update and the bundle file that carries it.
//!
//! The artifact is the model package directory as a tar archive, built so that the same
//! directory always gives the same bytes (sorted entries, no owners, no times): two operators
//! bundling one package get one SHA-256. A box unpacks it only after the whole artifact matched
//! its signed hash, and even then accepts nothing but plain files and directories whose every
//! path component is a plain name: no `..`, no absolute paths, no links, no devices.
//!
//! A bundle file (what `tern-update bundle` writes and `ternd install` reads) is a tar archive
//! of two entries, `manifest.json` and then `artifact.tar`, so `tar tf` shows what is inside.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use crate::bundle::{MAX_ARTIFACT_BYTES, MAX_MANIFEST_BYTES, Manifest, RefusalError, safe_name};

/// Entries in one package, at most: bounds the work a hostile artifact can cause.
const MAX_ENTRIES: usize = 4096;
const MANIFEST_ENTRY: &str = "manifest.json";
const ARTIFACT_ENTRY: &str = "artifact.tar";

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Refused(#[from] RefusalError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl UnpackError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The package directory `dir` as a deterministic tar archive.
pub fn pack(dir: &Path) -> io::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect(dir, Path::new(""), &mut files)?;
    files.sort();
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for (rel, is_dir) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if is_dir {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
        } else {
            let f = File::open(dir.join(&rel))?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(f.metadata()?.len());
            b.append_data(&mut h, &rel, f)?;
        }
    }
    b.into_inner()
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) -> io::Result<()> {
    for e in std::fs::read_dir(root.join(rel))? {
        let e = e?;
        let rel = rel.join(e.file_name());
        let t = e.file_type()?;
        if t.is_dir() {
            out.push((rel.clone(), true));
            collect(root, &rel, out)?;
        } else if t.is_file() {
            out.push((rel, false));
        } else {
            return Err(io::Error::other(format!(
                "{}: only files and directories go into a bundle",
                root.join(rel).display()
            )));
        }
    }
    Ok(())
}

/// A path inside a package, if every component is a plain name.
fn safe_path(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) if safe_name(n.to_str()?) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Unpack the artifact in `reader` into `dest` (which must not exist yet), fsyncing every file
/// and directory. The caller unpacks into a temporary name and renames it into place.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<(), UnpackError> {
    std::fs::create_dir(dest).map_err(UnpackError::io(dest))?;
    let mut dirs = vec![dest.to_path_buf()];
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(UnpackError::io(dest))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(
                RefusalError::BadArtifact(format!("more than {MAX_ENTRIES} entries")).into(),
            );
        }
        let mut entry = entry.map_err(UnpackError::io(dest))?;
        let raw = entry.path().map_err(UnpackError::io(dest))?.into_owned();
        let rel =
            safe_path(&raw).ok_or_else(|| RefusalError::BadName(raw.display().to_string()))?;
        let path = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&path).map_err(UnpackError::io(&path))?;
                dirs.push(path);
            }
            tar::EntryType::Regular => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(UnpackError::io(parent))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(UnpackError::io(&path))?;
                io::copy(&mut entry, &mut f).map_err(UnpackError::io(&path))?;
                f.sync_all().map_err(UnpackError::io(&path))?;
            }
            other => {
                return Err(RefusalError::BadName(format!(
                    "{} is a {other:?} entry; only files and directories are allowed",
                    raw.display()
                ))
                .into());
            }
        }
    }
    for d in dirs.iter().rev() {
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(UnpackError::io(d))?;
    }
    Ok(())
}

/// A bundle file opened for reading: its manifest, and where the artifact lies in the file.
#[derive(Debug)]
pub struct BundleFile {
    pub path: PathBuf,
    /// The file as opened: the artifact is read from it, never from the path again (which
    /// may have been removed or swapped since).
    file: File,
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub artifact_offset: u64,
    pub artifact_len: u64,
}

/// `path` opened for reading if it is a regular file (O_NONBLOCK, so a FIFO's open does not
/// wait for a writer; it has no effect on a regular file's reads).
fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

impl BundleFile {
    /// Open `path`, reading no more than the manifest's bound into memory.
    /// Only a regular file is read: opening a FIFO or a device would wait on a writer (or
    /// read forever), and whoever names the path need not be trusted that far.
    pub fn open(path: &Path) -> Result<BundleFile, UnpackError> {
        let file = open_regular(path).map_err(UnpackError::io(path))?;
        let mut archive = tar::Archive::new(file.try_clone().map_err(UnpackError::io(path))?);
        let mut manifest_bytes = None;
        let mut artifact = None;
        let entries = archive.entries_with_seek().map_err(UnpackError::io(path))?;
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::io(path))?;
            let name = entry.path().map_err(UnpackError::io(path))?.into_owned();
            let size = entry.size();
            if name == Path::new(MANIFEST_ENTRY) && manifest_bytes.is_none() {
                if size > MAX_MANIFEST_BYTES as u64 {
                    return Err(RefusalError::TooLarge {
                        what: "manifest",
                        got: size.min(usize::MAX as u64) as usize,
                        max: MAX_MANIFEST_BYTES,
                    }
                    .into());
                }
                let mut b = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut b).map_err(UnpackError::io(path))?;
                manifest_bytes = Some(b);
            } else if name == Path::new(ARTIFACT_ENTRY) && artifact.is_none() {
                if size > MAX_ARTIFACT_BYTES {
                    return Err(RefusalError::TooLarge {
                        what: "artifact",
                        got: size.min(usize::MAX as u64) as usize,
                        max: MAX_ARTIFACT_BYTES as usize,
                    }
                    .into());
                }
                artifact = Some((entry.raw_file_position(), size));
            } else {
                return Err(RefusalError::Malformed(format!(
                    "unexpected entry `{}` in the bundle",
                    name.display()
                ))
                .into());
            }
        }
        let manifest_bytes = manifest_bytes
            .ok_or_else(|| RefusalError::Malformed(format!("no {MANIFEST_ENTRY} in the bundle")))?;
        let (artifact_offset, artifact_len) = artifact
            .ok_or_else(|| RefusalError::Malformed(format!("no {ARTIFACT_ENTRY} in the bundle")))?;
        let manifest = crate::bundle::parse(&manifest_bytes)?;
        Ok(BundleFile {
            path: path.to_path_buf(),
            file,
            manifest_bytes,
            manifest,
            artifact_offset,
            artifact_len,
        })
    }

    /// A reader of exactly the artifact's bytes, from the file `open` read (one reader at a
    /// time: the readers share the file's position).
    pub fn artifact(&self) -> io::Result<io::Take<File>> {
        let mut f = self.file.try_clone()?;
        f.seek(SeekFrom::Start(self.artifact_offset))?;
        Ok(f.take(self.artifact_len))
    }
}

/// Write a bundle file: to a temporary name beside `path`, fsynced, then renamed into place.
pub fn write_bundle(path: &Path, manifest: &Manifest, artifact: &mut dyn Read) -> io::Result<()> {
    let manifest = serde_json::to_vec_pretty(manifest).expect("manifests serialise");
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    // The artifact's size goes in its header before its bytes: spool it to a second temp file
    // so a bundle of any size never has to sit in memory.
    let mut spool = tempfile::tempfile_in(dir)?;
    let len = io::copy(artifact, &mut spool)?;
    spool.seek(SeekFrom::Start(0))?;
    {
        let mut b = tar::Builder::new(tmp.as_file());
        for (name, size) in [
            (MANIFEST_ENTRY, manifest.len() as u64),
            (ARTIFACT_ENTRY, len),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(size);
            if name == MANIFEST_ENTRY {
                b.append_data(&mut h, name, &manifest[..])?;
            } else {
                b.append_data(&mut h, name, &mut spool)?;
            }
        }
        b.finish()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("golden")).unwrap();
        std::fs::write(dir.join("tern-model.toml"), "name = \"m\"\n").unwrap();
        std::fs::write(dir.join("golden/0.npy"), [1u8, 2, 3]).unwrap();
    }

    #[test]
    fn pack_is_deterministic_and_unpacks_to_the_same_files() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        tree(&a);
        tree(&b);
        let (pa, pb) = (pack(&a).unwrap(), pack(&b).unwrap());
        assert_eq!(crate::sha256_hex(&pa), crate::sha256_hex(&pb));
        let out = d.path().join("out");
        unpack(&pa[..], &out).unwrap();
        assert_eq!(std::fs::read(out.join("golden/0.npy")).unwrap(), [1, 2, 3]);
        assert_eq!(
            std::fs::read_to_string(out.join("tern-model.toml")).unwrap(),
            "name = \"m\"\n"
        );
    }

    fn hostile(path: &str, kind: tar::EntryType) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(if kind == tar::EntryType::Regular {
            1
        } else {
            0
        });
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/passwd").unwrap();
        }
        // `append_data` refuses `..`; a hostile archive is written byte by byte.
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, &b"x"[..h.entry_size().unwrap() as usize])
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn escaping_names_links_and_devices_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for (i, (path, kind)) in [
            ("../evil", tar::EntryType::Regular),
            ("/etc/evil", tar::EntryType::Regular),
            ("a/../../evil", tar::EntryType::Regular),
            ("link", tar::EntryType::Symlink),
            ("dev", tar::EntryType::Char),
        ]
        .into_iter()
        .enumerate()
        {
            let out = d.path().join(format!("out{i}"));
            let err = unpack(&hostile(path, kind)[..], &out).unwrap_err();
            match err {
                UnpackError::Refused(r) => assert_eq!(r.code(), "bad_name", "{path}"),
                other => panic!("{path}: {other}"),
            }
            assert!(!d.path().join("evil").exists());
        }
    }

    #[test]
    fn bundle_file_round_trips_and_bounds_its_manifest() {
        let d = tempfile::tempdir().unwrap();
        let m = Manifest {
            signed: serde_json::json!({"name": "x"}),
            signatures: vec![],
        };
        let path = d.path().join("x.bundle");
        let art = vec![9u8; 100_000];
        write_bundle(&path, &m, &mut &art[..]).unwrap();
        let b = BundleFile::open(&path).unwrap();
        assert_eq!(b.manifest, m);
        let mut got = Vec::new();
        b.artifact().unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, art);

        // The path removed and a FIFO put in its place: the artifact is still read, whole,
        // from the file that was opened (the FIFO would block a reader for good).
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        let mut again = Vec::new();
        b.artifact().unwrap().read_to_end(&mut again).unwrap();
        assert_eq!(again, art);
        std::fs::remove_file(&path).unwrap();

        // A manifest entry past the bound is refused before it is read.
        let mut big = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size((MAX_MANIFEST_BYTES + 1) as u64);
        h.set_mode(0o644);
        big.append_data(
            &mut h,
            MANIFEST_ENTRY,
            &vec![b' '; MAX_MANIFEST_BYTES + 1][..],
        )
        .unwrap();
        std::fs::write(&path, big.into_inner().unwrap()).unwrap();
        match BundleFile::open(&path).unwrap_err() {
            UnpackError::Refused(r) => assert_eq!(r.code(), "oversize"),
            other => panic!("{other}"),
        }
    }
}
