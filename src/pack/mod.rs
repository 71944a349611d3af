//! The pack directory `adapt` writes and `export` reads:
//!
//! ```text
//! PACK/manifest.json          what was done, with the sha256 of every file below
//! PACK/backbone.onnx          the source backbone as given
//! PACK/model.onnx             backbone + one head per task, latest weights
//! PACK/state/after_<task>/method.safetensors   the method's record after each task
//!                             (methods::Record: Fisher sums, owner ids, mask bits, per-task
//!                             copies); state/ also caches features and recorded LwF targets
//! PACK/checkpoint/            the task in progress: weights and optimizer after each epoch
//! PACK/.lock                  held by the one process writing the pack (see `lock`)
//! ```
//!
//! Every file is written atomically and the manifest last, so a killed run leaves either the
//! previous consistent state or the new one.

pub mod artifact;
pub mod export;
pub mod lock;
pub mod manifest;
pub mod specialize;
pub mod verify;

use std::path::{Path, PathBuf};

pub use manifest::{Manifest, Metrics, TaskRecord, PACK_SCHEMA};

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid pack manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("{path} is in use: {holder}; wait for it to finish or pass --wait")]
    Busy { path: PathBuf, holder: String },
}

/// Paths inside a pack directory.
#[derive(Clone, Debug)]
pub struct Pack {
    pub dir: PathBuf,
}

impl Pack {
    pub fn new(dir: &Path) -> Pack {
        Pack { dir: dir.to_path_buf() }
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    pub fn backbone(&self) -> PathBuf {
        self.dir.join("backbone.onnx")
    }

    pub fn model(&self) -> PathBuf {
        self.dir.join("model.onnx")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    pub fn exists(&self) -> bool {
        self.manifest_path().is_file()
    }

    pub fn create_dirs(&self) -> Result<(), PackError> {
        for d in [self.dir.clone(), self.state_dir(), self.checkpoint_dir()] {
            std::fs::create_dir_all(&d).map_err(|source| PackError::Write { path: d, source })?;
        }
        Ok(())
    }

    pub fn load_manifest(&self) -> Result<Manifest, PackError> {
        let path = self.manifest_path();
        let text = std::fs::read(&path).map_err(|source| PackError::Read { path: path.clone(), source })?;
        let m: Manifest =
            serde_json::from_slice(&text).map_err(|source| PackError::Manifest { path: path.clone(), source })?;
        if m.schema != PACK_SCHEMA {
            return Err(PackError::Invalid { path, problem: format!("schema '{}' is not {PACK_SCHEMA}", m.schema) });
        }
        Ok(m)
    }

    /// Writes the manifest atomically, after recording the digest of every file it lists.
    pub fn save_manifest(&self, m: &mut Manifest) -> Result<(), PackError> {
        let mut files = std::collections::BTreeMap::new();
        for rel in m.files.keys().cloned().collect::<Vec<_>>() {
            files.insert(rel.clone(), file_sha256(&self.dir.join(&rel))?);
        }
        m.files = files;
        let path = self.manifest_path();
        let text = serde_json::to_vec_pretty(m).map_err(|source| PackError::Manifest { path: path.clone(), source })?;
        crate::fsutil::write_atomic(&path, &text).map_err(|source| PackError::Write { path, source })
    }

    /// Checks every file digest the manifest records.
    pub fn verify_files(&self, m: &Manifest) -> Result<(), PackError> {
        for (rel, want) in &m.files {
            let got = file_sha256(&self.dir.join(rel))?;
            if &got != want {
                return Err(PackError::Invalid {
                    path: self.dir.join(rel),
                    problem: format!("sha256 {got} differs from the manifest's {want}"),
                });
            }
        }
        Ok(())
    }
}

pub fn file_sha256(path: &Path) -> Result<String, PackError> {
    crate::fsutil::file_sha256(path).map_err(|source| PackError::Read { path: path.to_path_buf(), source })
}
