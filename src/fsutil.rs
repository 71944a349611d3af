//! File writes that never leave a half-written file behind: write to a temporary file in the
//! destination's directory, flush it to disk, then rename it over the destination.

use std::io::Write;
use std::path::Path;

/// Names the environment variable that makes writes fail, for testing what a full disk or a
/// read-only directory does to a run: `MTPACK_FAIL_WRITE=SUBSTRING` fails every write whose
/// path contains SUBSTRING with "no space left on device" (half the bytes written first, as
/// a disk filling up would); `SUBSTRING:readonly` fails it as a read-only file system would.
pub const FAIL_WRITE_ENV: &str = "MTPACK_FAIL_WRITE";

/// The failure the environment asks for when writing `path`, if any.
fn injected_failure(path: &Path) -> Option<std::io::Error> {
    let spec = std::env::var(FAIL_WRITE_ENV).ok()?;
    let (pattern, code) = match spec.strip_suffix(":readonly") {
        Some(p) => (p, libc::EROFS),
        None => (spec.as_str(), libc::ENOSPC),
    };
    let hit = !pattern.is_empty() && path.to_string_lossy().contains(pattern);
    hit.then(|| std::io::Error::from_raw_os_error(code))
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let failure = match injected_failure(path) {
        // A read-only directory refuses the temporary file itself.
        Some(e) if e.raw_os_error() == Some(libc::EROFS) => return Err(e),
        other => other,
    };
    let mut tmp = tempfile::Builder::new().prefix(".mtpack-").suffix(".tmp").tempfile_in(dir)?;
    if let Some(e) = failure {
        tmp.write_all(&bytes[..bytes.len() / 2])?;
        return Err(e);
    }
    tmp.write_all(bytes)?;
    // Temporary files are created private (0600); results are ordinary files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The sha256 of a file's bytes, in lowercase hex: how packs and manifests identify the
/// backbone, the datasets and their own files.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn an_injected_failure_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.bin");
        write_atomic(&p, b"old").unwrap();
        // The variable is read on every write; this test's path is unique to it.
        std::env::set_var(FAIL_WRITE_ENV, "keep.bin");
        let full = write_atomic(&p, b"new contents").unwrap_err();
        std::env::set_var(FAIL_WRITE_ENV, "keep.bin:readonly");
        let readonly = write_atomic(&p, b"new contents").unwrap_err();
        std::env::remove_var(FAIL_WRITE_ENV);
        assert_eq!(full.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(readonly.raw_os_error(), Some(libc::EROFS));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_atomic(&dir.path().join("no/such/dir/f"), b"x").is_err());
    }
}
