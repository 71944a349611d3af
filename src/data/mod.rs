//! Task datasets: the safetensors file format, importers, splits and preprocessing.

mod dataset;
mod error;
pub mod import;
mod preprocess;

pub use dataset::{Dataset, Split, Summary, FORMAT};
pub use error::DataError;
pub use preprocess::{parse_hw, resize_bilinear, Layout, Preprocessing};
