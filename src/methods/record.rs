//! A method's state as the pack stores it, apart from the live method that trains with it
//! (the split between a module and its record): named tables of host tensors, e.g. EWC's
//! Fisher sums `F` and `FT`, PackNet's `owner` ids, Piggyback's `bits` and their `shape`s,
//! the `per_task` parameters of the mask methods. The pack writes a record after each task
//! (`state/after_<task>/method.safetensors`) and inside each checkpoint; this file is the
//! one place that turns tables into file keys (`table/tensor`) and back.

use std::collections::BTreeMap;
use std::path::Path;

use crate::tensor::Tensor;
use crate::train::TrainError;

/// The file a record is stored in, in a task's state folder.
pub const RECORD_FILE: &str = "method.safetensors";

/// The files earlier versions wrote instead of one record, each with keys already of the
/// `table/tensor` form: read together, they are the same record.
const LEGACY_FILES: [&str; 4] =
    ["ewc.safetensors", "packnet.safetensors", "piggyback.safetensors", "per_task.safetensors"];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    tables: BTreeMap<String, BTreeMap<String, Tensor>>,
}

impl Record {
    pub fn is_empty(&self) -> bool {
        self.tables.values().all(BTreeMap::is_empty)
    }

    /// Adds `tensor` under `name` to `table` (table names never contain a `/`).
    pub fn insert(&mut self, table: &str, name: &str, tensor: Tensor) {
        self.tables.entry(table.to_string()).or_default().insert(name.to_string(), tensor);
    }

    /// The tensors of `table` (none if the record has no such table).
    pub fn table(&self, table: &str) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tables.get(table).into_iter().flatten().map(|(k, v)| (k.as_str(), v))
    }

    /// One tensor of `table`.
    pub fn get(&self, table: &str, name: &str) -> Option<&Tensor> {
        self.tables.get(table)?.get(name)
    }

    /// The record as flat `table/tensor` keys (how files and checkpoints hold it).
    pub fn flatten(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (table, entries) in &self.tables {
            for (name, t) in entries {
                out.push((format!("{table}/{name}"), t.clone()));
            }
        }
        out
    }

    /// The record from flat keys; `from` names where they were read, for the error.
    pub fn from_flat(
        flat: impl IntoIterator<Item = (String, Tensor)>,
        from: &dyn std::fmt::Display,
    ) -> Result<Record, TrainError> {
        let mut r = Record::default();
        for (key, t) in flat {
            let Some((table, name)) = key.split_once('/') else {
                return Err(TrainError::Invalid(format!("{from}: method state '{key}' names no table")));
            };
            r.insert(table, name, t);
        }
        Ok(r)
    }

    /// Writes the record as `dir/method.safetensors`; returns the file's name, or nothing for
    /// an empty record (no file is written).
    pub fn save(&self, dir: &Path) -> Result<Option<&'static str>, TrainError> {
        if self.is_empty() {
            return Ok(None);
        }
        let flat = self.flatten();
        let refs: Vec<(&str, &Tensor)> = flat.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::store::save(&dir.join(RECORD_FILE), &refs, Default::default())?;
        Ok(Some(RECORD_FILE))
    }

    /// Reads the record a task left in `dir`: `method.safetensors`, or the separate files of
    /// packs written before records, or an empty record where the method kept no state.
    pub fn load(dir: &Path) -> Result<Record, TrainError> {
        let one = dir.join(RECORD_FILE);
        let files: Vec<_> = if one.exists() {
            vec![one]
        } else {
            LEGACY_FILES.iter().map(|f| dir.join(f)).filter(|f| f.exists()).collect()
        };
        let mut r = Record::default();
        for file in files {
            let (t, _) = crate::store::load(&file)?;
            let part = Record::from_flat(t, &file.display())?;
            for (table, entries) in part.tables {
                r.tables.entry(table).or_default().extend(entries);
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: f32) -> Tensor {
        Tensor::F32(ndarray::arr1(&[v]).into_dyn())
    }

    #[test]
    fn a_record_round_trips_through_its_file_with_slashes_in_tensor_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Record::default();
        r.insert("F", "model/conv/kernel", t(1.0));
        r.insert("owner", "w", t(2.0));
        assert_eq!(r.save(dir.path()).unwrap(), Some(RECORD_FILE));
        let back = Record::load(dir.path()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.get("F", "model/conv/kernel"), Some(&t(1.0)));
        assert_eq!(back.table("missing").count(), 0);
    }

    #[test]
    fn packs_written_before_records_load_from_their_separate_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (t(1.0), t(2.0));
        crate::store::save(&dir.path().join("ewc.safetensors"), &[("F/w", &a)], Default::default()).unwrap();
        crate::store::save(&dir.path().join("per_task.safetensors"), &[("per_task/b", &b)], Default::default())
            .unwrap();
        let r = Record::load(dir.path()).unwrap();
        assert_eq!(r.get("F", "w"), Some(&a));
        assert_eq!(r.get("per_task", "b"), Some(&b));
    }

    #[test]
    fn an_empty_record_writes_nothing_and_a_key_without_table_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Record::default().save(dir.path()).unwrap(), None);
        assert!(Record::load(dir.path()).unwrap().is_empty());
        let err = Record::from_flat([("loose".to_string(), t(0.0))], &"ckpt").unwrap_err();
        assert!(err.to_string().contains("ckpt: method state 'loose' names no table"), "{err}");
    }
}
