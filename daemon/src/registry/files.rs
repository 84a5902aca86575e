//! A package on disk: its files, its digest, and a copy that a power cut leaves whole or
//! absent.

use std::path::{Path, PathBuf};

use super::RegistryError;
use crate::engine::{MANIFEST_FILE, MODEL_FILE};

/// The files of a package, relative paths sorted; symlinks and special files are refused so
/// that nothing outside the package is read or copied.
fn package_files(root: &Path) -> Result<Vec<PathBuf>, RegistryError> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), RegistryError> {
        let dir = root.join(rel);
        let io = |source| RegistryError::Io {
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let ft = entry.file_type().map_err(io)?;
            let rel = rel.join(entry.file_name());
            if ft.is_dir() {
                walk(root, &rel, out)?;
            } else if ft.is_file() {
                out.push(rel);
            } else {
                return Err(RegistryError::Package {
                    path: root.join(&rel),
                    message: "is not a regular file or directory; packages may not hold links"
                        .into(),
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out)?;
    out.sort();
    for required in [MANIFEST_FILE, MODEL_FILE] {
        if !out.iter().any(|p| p == Path::new(required)) {
            return Err(RegistryError::Package {
                path: root.to_path_buf(),
                message: format!("has no {required}"),
            });
        }
    }
    Ok(out)
}

/// SHA-256 over every file's relative path, length and bytes, in path order. Streams: a
/// package's size never decides how much memory this takes.
pub fn package_digest(root: &Path) -> Result<String, RegistryError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    for rel in package_files(root)? {
        let path = root.join(&rel);
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(&path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        ctx.update(rel.to_string_lossy().as_bytes());
        ctx.update(&[0]);
        ctx.update(&len.to_le_bytes());
        let mut seen = 0u64;
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            ctx.update(&buf[..n]);
        }
        if seen != len {
            return Err(RegistryError::Package {
                path,
                message: "changed while being hashed".into(),
            });
        }
    }
    Ok(tern_update::hex(ctx.finish().as_ref()))
}

/// Copy a package to `dest` so that a crash at any instant leaves either nothing at `dest` or
/// the complete package: write under a temporary name, fsync every file and directory,
/// rename, fsync the parent.
pub(super) fn copy_package(src: &Path, dest: &Path) -> Result<(), RegistryError> {
    let parent = dest.parent().expect("dest has a parent");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Io { path, source }
    };
    create_dirs_durably(parent)?;
    let file_name = dest.file_name().expect("dest has a name").to_string_lossy();
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    // A leftover from a crash after rename but before the database insert: replace it.
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io(dest))?;
    }
    let files = package_files(src)?;
    let mut dirs = vec![tmp.clone()];
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    for rel in &files {
        let to = tmp.join(rel);
        let dir = to.parent().expect("file has a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            dirs.push(dir.to_path_buf());
        }
        let mut from = std::fs::File::open(src.join(rel)).map_err(io(&src.join(rel)))?;
        let mut f = std::fs::File::create(&to).map_err(io(&to))?;
        std::io::copy(&mut from, &mut f).map_err(io(&to))?;
        f.sync_all().map_err(io(&to))?;
    }
    for d in dirs.iter().rev() {
        fsync_dir(d)?;
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    fsync_dir(parent)?;
    Ok(())
}

/// `create_dir_all`, but each directory it creates is fsynced into its parent, so the path
/// still exists after a power cut.
fn create_dirs_durably(dir: &Path) -> Result<(), RegistryError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(source) => {
            return Err(RegistryError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fsync_dir(parent),
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), RegistryError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| RegistryError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Remove the bundle copies `sudo ternd install` makes for the service user, left only when
/// that command was killed. Only the daemon does this, at start: an offline `ternd install`
/// made its own copy before it took the state directory.
pub fn clean_install_copies(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".install-") && name.ends_with(".bundle") {
            tracing::info!(path = %e.path().display(), "removing a bundle copy left by an interrupted `ternd install`");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Remove temporary install directories a crash left behind.
pub fn clean_temp(state_dir: &Path) {
    let Ok(models) = std::fs::read_dir(state_dir.join("models")) else {
        return;
    };
    for model in models.flatten() {
        let Ok(versions) = std::fs::read_dir(model.path()) else {
            continue;
        };
        for v in versions.flatten() {
            if v.file_name().to_string_lossy().contains(".tmp-") {
                tracing::info!(path = %v.path().display(), "removing an interrupted install");
                let _ = std::fs::remove_dir_all(v.path());
            }
        }
    }
}
