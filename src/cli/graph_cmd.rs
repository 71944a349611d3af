//! `mtpack graph`: graph surgery from the command line (cut, heads, merge).

use std::path::PathBuf;

use anyhow::Context;

use super::{load, Outcome};
use crate::graph::analysis::{find_feature, find_head};
use crate::graph::cut;
use crate::graph::heads::{add_heads, drop_head, merge_suffixes, LinearHead};

#[derive(clap::Subcommand, Debug)]
pub enum GraphCommand {
    /// Cut a model at a tensor into a prefix (inputs -> tensor) and a suffix (tensor -> outputs).
    Cut {
        model: PathBuf,
        /// The tensor to cut at (see `mtpack inspect` for the feature tensor).
        #[arg(long)]
        at: String,
        /// Where to write the prefix model.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Where to write the suffix model.
        #[arg(long)]
        suffix: Option<PathBuf>,
    },
    /// Remove the classifier head; the feature tensor becomes the output.
    DropHead {
        model: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Append a new linear head of K classes (randomly initialised) on the feature tensor.
    AddHead {
        model: PathBuf,
        /// Number of classes.
        #[arg(long)]
        classes: usize,
        /// Name of the head; its output is <name>/logits.
        #[arg(long, default_value = "head")]
        name: String,
        /// Tensor to attach to; default: the feature tensor `inspect` finds.
        #[arg(long)]
        feature: Option<String>,
        /// Width of the feature tensor, when the model does not declare it.
        #[arg(long)]
        feature_dim: Option<usize>,
        /// Seed of the initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Drop the model's existing outputs instead of keeping them.
        #[arg(long)]
        replace: bool,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Attach suffix models to one tensor of a base model so one pass feeds them all.
    Merge {
        base: PathBuf,
        /// The tensor of the base model that feeds every suffix.
        #[arg(long)]
        at: String,
        /// NAME=FILE: a suffix model with one input; its names get the prefix NAME/.
        #[arg(long = "suffix", required = true, value_parser = parse_named)]
        suffixes: Vec<(String, PathBuf)>,
        #[arg(long, short)]
        output: PathBuf,
    },
}

fn parse_named(s: &str) -> Result<(String, PathBuf), String> {
    let (n, f) = s.split_once('=').ok_or_else(|| format!("'{s}' is not NAME=FILE"))?;
    if n.is_empty() || f.is_empty() {
        return Err(format!("'{s}' is not NAME=FILE"));
    }
    Ok((n.to_string(), PathBuf::from(f)))
}

pub fn run(c: GraphCommand) -> anyhow::Result<Outcome> {
    match c {
        GraphCommand::Cut { model, at, prefix, suffix } => {
            let m = load::model(&model)?;
            let ctx = || format!("{}: cutting at '{at}'", model.display());
            if prefix.is_none() && suffix.is_none() {
                anyhow::bail!("give --prefix and/or --suffix to say what to write");
            }
            // Both halves are computed before either is written, so a bad cut writes nothing.
            let p = prefix.as_ref().map(|_| cut::prefix(&m, &at)).transpose().with_context(ctx)?;
            let s = suffix.as_ref().map(|_| cut::suffix(&m, &at)).transpose().with_context(ctx)?;
            if let (Some(path), Some(p)) = (&prefix, &p) {
                load::save(p, path)?;
            }
            if let (Some(path), Some(s)) = (&suffix, &s) {
                load::save(s, path)?;
            }
        }
        GraphCommand::DropHead { model, output } => {
            let m = load::model(&model)?;
            let out = drop_head(&m).with_context(|| model.display().to_string())?;
            load::save(&out, &output)?;
        }
        GraphCommand::AddHead { model, classes, name, feature, feature_dim, seed, replace, output } => {
            let m = load::model(&model)?;
            let g = m.graph();
            let found = find_feature(g, find_head(g).as_ref());
            let tensor = feature.or_else(|| found.as_ref().map(|f| f.tensor.clone()));
            let tensor =
                tensor.with_context(|| format!("{}: no feature tensor found; pass --feature", model.display()))?;
            let dim = feature_dim
                .or_else(|| found.as_ref().filter(|f| f.tensor == tensor).and_then(|f| f.dim))
                .with_context(|| {
                    format!("{}: the width of '{tensor}' is not declared; pass --feature-dim", model.display())
                })?;
            if classes < 2 {
                anyhow::bail!("--classes must be at least 2, got {classes}");
            }
            let head = LinearHead::init(classes, dim, seed);
            let out = add_heads(&m, &tensor, &[(name, head)], replace).with_context(|| model.display().to_string())?;
            load::save(&out, &output)?;
        }
        GraphCommand::Merge { base, at, suffixes, output } => {
            let m = load::model(&base)?;
            let mut loaded = Vec::new();
            for (name, path) in suffixes {
                loaded.push((name, load::model(&path)?));
            }
            let out = merge_suffixes(&m, &at, &loaded).with_context(|| base.display().to_string())?;
            load::save(&out, &output)?;
        }
    }
    Ok(Outcome::Ok)
}
