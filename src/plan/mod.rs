//! The adaptation plan: the backbone, the method with its parameters, and the tasks in order
//! with their data, preprocessing and hyper-parameters. Read from a TOML file or built from
//! command-line flags; validated before any training starts. `data` prepares a task's data
//! as the plan states it. The layer sits above `methods` (a plan names a registered method and
//! its parameters; methods never read a plan, they get a task's context from the runner) and
//! below `pack` (which records and re-reads plans) and `adapt` (which runs them).

pub mod data;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Preprocessing;
use crate::engine::kernels::{Kernels, Precision};
use crate::methods::{MethodKind, MethodParams};
use crate::runtime::device::DeviceChoice;
use crate::train::Hyper;

/// The committed tiny backbone the main job uses when none is given.
pub fn default_backbone() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny_digits.onnx")
}

/// The built-in default sequence: the bundled UCI digits split into two tasks, 0-4 then 5-9
/// (the "split digits" protocol of the continual-learning literature).
pub fn default_tasks() -> Vec<TaskPlan> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/digits/digits.safetensors");
    [("digits-0-4", [0, 1, 2, 3, 4]), ("digits-5-9", [5, 6, 7, 8, 9])]
        .into_iter()
        .map(|(name, classes)| TaskPlan {
            name: name.into(),
            dataset: data.clone(),
            classes: Some(classes.to_vec()),
            labels: None,
            test_fraction: None,
            train_per_class: None,
            preprocessing: Default::default(),
            hyper: Default::default(),
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPlan {
    pub name: String,
    pub dataset: PathBuf,
    /// Keep only these classes of the dataset, relabelled 0..k in this order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<i64>>,
    /// Label names overriding the dataset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// Held out when the dataset has no test split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_fraction: Option<f64>,
    /// Train on at most this many images of each class (a seeded choice; the held-out split
    /// is kept whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_per_class: Option<usize>,
    #[serde(default)]
    pub preprocessing: Preprocessing,
    #[serde(default, flatten)]
    pub hyper: Hyper,
}

/// How BatchNormalization behaves while the backbone trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormMode {
    /// Normalise with each batch's statistics and update the running ones (PyTorch's
    /// `train()`, what the methods' papers and libraries do).
    #[default]
    Batch,
    /// Keep the recorded statistics (PyTorch's `eval()`); needs a lower learning rate.
    Frozen,
}

/// Epochs of the linear probe before a method trains the backbone (LP-FT). The probe trains
/// like feature-extract (SGD, lr 0.01, momentum 0.9, the task's batch) on features computed
/// once, so its epochs cost little next to one epoch through the backbone; ten of them fit
/// the head on the small datasets where a random head's first gradients do the most harm.
pub const LINEAR_PROBE_EPOCHS: u64 = 10;

/// The default learning rate with frozen BatchNorm statistics: fine-tuning MobileNetV2 with
/// them at 0.01 diverged here and did not learn in PyTorch either; at 0.001 both learn.
pub const FROZEN_BN_LR: f64 = 1e-3;

/// The same from a probed head: with nothing renormalising the activations, a fitted head's
/// gradients at 0.001 wrecked MobileNetV2 in one epoch on 400 images (held-out 0.10, from a
/// probe at 0.78); at 1e-4 it ended at 0.79.
pub const FROZEN_BN_PROBED_LR: f64 = 1e-4;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// None: the committed tiny backbone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<PathBuf>,
    pub method: MethodKind,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceChoice,
    /// mtpack's CPU kernels (native) or candle's portable ops, which a GPU always runs.
    #[serde(default, skip_serializing_if = "is_native")]
    pub kernels: Kernels,
    /// Of the linear layers' matrix products while training (bf16: AMX, f32 sums).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
    /// None: the method's default for the backbone (see `Plan::for_backbone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batchnorm: Option<BatchNormMode>,
    /// The tensor new heads attach to; everything after it is dropped. None: the input of the
    /// backbone's own classifier, or its graph output when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// How a token sequence or feature map becomes one vector per image (default: mean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::graph::features::Pool>,
    /// The backbone input's layout for every task that does not set its own (default: read
    /// from the declared input shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<crate::data::Layout>,
    /// Recompute BatchNorm's running statistics after each task from the data it trained on,
    /// with the final weights (precise BN). None: on where BatchNorm trains with batch
    /// statistics (see `Plan::for_backbone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_recalibrate: Option<bool>,
    /// Epochs fitting a new head alone on cached features of the frozen backbone before the
    /// task trains (LP-FT), for methods that train on images; 0 turns it off. None:
    /// `LINEAR_PROBE_EPOCHS` where BatchNorm keeps its recorded statistics, else off (see
    /// `Plan::for_backbone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_probe_epochs: Option<u64>,
    /// Choose each task's learning rate on a validation split of its own training data
    /// (`adapt::tune`) before training it on all of it. None: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<bool>,
    /// Settings every task inherits.
    #[serde(default)]
    pub defaults: Hyper,
    #[serde(default)]
    pub params: MethodParams,
    #[serde(rename = "task")]
    pub tasks: Vec<TaskPlan>,
}

fn is_native(k: &Kernels) -> bool {
    *k == Kernels::Native
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

impl Plan {
    /// A plan with every setting at its default.
    pub fn new(backbone: Option<PathBuf>, method: MethodKind, tasks: Vec<TaskPlan>) -> Plan {
        Plan {
            backbone,
            method,
            seed: 0,
            device: DeviceChoice::default(),
            kernels: Kernels::Native,
            precision: Precision::F32,
            batchnorm: None,
            at: None,
            pool: None,
            layout: None,
            bn_recalibrate: None,
            linear_probe_epochs: None,
            tune: None,
            defaults: Hyper::default(),
            params: MethodParams::default(),
            tasks,
        }
    }

    pub fn from_toml(text: &str) -> Result<Plan, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks what can be checked without reading data: names, settings, method params.
    pub fn validate(&self) -> Result<(), String> {
        if self.tasks.is_empty() {
            return Err("the plan has no tasks (give --task NAME=DATASET)".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.tasks {
            let ok = !t.name.is_empty() && t.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(format!("task name '{}' must be letters, digits, '-', '_' or '.'", t.name));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(format!("task name '{}' is used twice", t.name));
            }
            self.hyper_of(t).resolve(&t.name)?;
            if t.train_per_class == Some(0) {
                return Err(format!("task '{}': train_per_class must be at least 1", t.name));
            }
            if let Some(f) = t.test_fraction {
                if !(0.0..1.0).contains(&f) {
                    return Err(format!("task '{}': test_fraction must be in [0, 1), got {f}", t.name));
                }
            }
            if let Some(c) = &t.classes {
                let mut s = c.clone();
                s.sort_unstable();
                s.dedup();
                if s.len() != c.len() || c.len() < 2 {
                    return Err(format!("task '{}': classes must list at least 2 distinct labels", t.name));
                }
            }
            t.preprocessing.validate().map_err(|e| format!("task '{}': {e}", t.name))?;
        }
        if self.bn_recalibrate == Some(true) && self.batchnorm == Some(BatchNormMode::Frozen) {
            return Err("bn_recalibrate needs batchnorm = batch: with frozen statistics BatchNorm's \
                        running values are the backbone's recorded ones, and training never used others"
                .into());
        }
        if self.precision == Precision::Bf16 {
            if self.kernels == Kernels::Portable || self.device != DeviceChoice::Cpu {
                return Err("--precision bf16 runs mtpack's CPU kernels only (AMX): not with \
                            --kernels portable or --device cuda"
                    .into());
            }
            self.precision.check_available()?;
        }
        self.params.validate()
    }

    /// The plan with the defaults that depend on the backbone filled in. On a backbone with
    /// BatchNormalization, the method may keep the recorded statistics by default
    /// (`Spec::frozen_batchnorm`, LwF's); frozen statistics bring the default learning rate
    /// down to `FROZEN_BN_LR` (`FROZEN_BN_PROBED_LR` after a linear probe) where the plan and
    /// the method set none.
    pub fn for_backbone(&self, model: &crate::onnx::Model) -> Plan {
        let bn = crate::methods::has_batchnorm(model);
        let mut p = self.clone();
        let mode = p.batchnorm.unwrap_or(if bn && p.method.spec().frozen_batchnorm {
            BatchNormMode::Frozen
        } else {
            BatchNormMode::Batch
        });
        p.batchnorm = Some(mode);
        let declared = crate::graph::analysis::single_input_shape(model.graph());
        let detected = declared.map(|d| crate::data::Layout::of_input(&d)).unwrap_or_default();
        for t in &mut p.tasks {
            // Recorded only when NHWC, so that plans of NCHW backbones keep their digests.
            let layout = t.preprocessing.layout.or(p.layout).unwrap_or(detected);
            t.preprocessing.layout = (layout == crate::data::Layout::Nhwc).then_some(layout);
        }
        // The probe is on by default only where the features it is fitted on are the ones
        // training sees (BatchNorm on its recorded statistics: frozen, or Piggyback's, which
        // never trains) and the backbone trains gently after it (`FROZEN_BN_PROBED_LR`, or
        // Piggyback's masks). Where BatchNorm trains with batch statistics at 0.01, a probed
        // head's larger gradients made things worse on the real sequence (README).
        let images = p.method.spec().data.inputs == crate::methods::Inputs::Images;
        let recorded = !p.trains_batch_statistics();
        let probe = if images && bn && recorded { LINEAR_PROBE_EPOCHS } else { 0 };
        p.linear_probe_epochs = Some(p.linear_probe_epochs.unwrap_or(probe));
        // Recalibration is on where BatchNorm trains with batch statistics: there the moving
        // averages lag the weights (README: EWC 0.911 -> 0.919 on the real sequence).
        p.bn_recalibrate = Some(p.bn_recalibrate.unwrap_or(images && bn && !recorded));
        if bn && mode == BatchNormMode::Frozen && p.method.hyper_defaults().lr.is_none() {
            let probed = p.linear_probe_epochs.is_some_and(|e| e > 0);
            p.defaults.lr = p.defaults.lr.or(Some(if probed { FROZEN_BN_PROBED_LR } else { FROZEN_BN_LR }));
        }
        p
    }

    /// The BatchNorm mode in effect (batch where `for_backbone` has not decided).
    pub fn batchnorm_mode(&self) -> BatchNormMode {
        self.batchnorm.unwrap_or_default()
    }

    /// Whether BatchNorm trains with batch statistics: the mode is batch and the method does
    /// not keep the recorded statistics anyway (Piggyback's frozen shared parameters).
    pub fn trains_batch_statistics(&self) -> bool {
        self.batchnorm_mode() == BatchNormMode::Batch && !(self.method.spec().keeps_recorded_batchnorm)(&self.params)
    }

    /// Task `t`'s settings: its own over the plan's defaults over the method's.
    pub fn hyper_of(&self, t: &TaskPlan) -> Hyper {
        t.hyper.over(&self.defaults).over(&self.method.hyper_defaults())
    }

    /// A digest of everything that determines the training result, to recognise a rerun of
    /// the same command.
    /// Fails only for a plan JSON cannot hold (a path that is not UTF-8): two such plans must
    /// not share a digest, or a rerun would take one pack for the other's.
    pub fn digest(&self) -> Result<String, serde_json::Error> {
        use sha2::{Digest, Sha256};
        let text = serde_json::to_string(self)?;
        Ok(format!("{:x}", Sha256::digest(text.as_bytes())))
    }
}

/// Parses `NAME=DATASET[:key=value...]` from the command line.
pub fn parse_task(spec: &str) -> Result<TaskPlan, String> {
    let (name, rest) =
        spec.split_once('=').ok_or_else(|| format!("--task '{spec}' is not NAME=DATASET[:key=value...]"))?;
    let mut parts = rest.split(':');
    let dataset = parts.next().filter(|d| !d.is_empty()).ok_or_else(|| format!("--task '{spec}': no dataset"))?;
    let mut t = TaskPlan {
        name: name.to_string(),
        dataset: PathBuf::from(dataset),
        classes: None,
        labels: None,
        test_fraction: None,
        train_per_class: None,
        preprocessing: Preprocessing::default(),
        hyper: Hyper::default(),
    };
    for kv in parts {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("--task '{name}': '{kv}' is not key=value"))?;
        set_option(&mut t, k, v).map_err(|e| format!("--task '{name}': {k}: {e}"))?;
    }
    Ok(t)
}

/// `on` or `off` (a switch on the command line).
pub fn parse_switch(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{v}' is not on or off")),
    }
}

fn list<T: std::str::FromStr>(v: &str) -> Result<Vec<T>, String> {
    v.split(',').map(|x| x.trim().parse::<T>().map_err(|_| format!("'{x}' is not a valid value"))).collect()
}

fn one<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.trim().parse::<T>().map_err(|_| format!("'{v}' is not a valid value"))
}

fn set_option(t: &mut TaskPlan, k: &str, v: &str) -> Result<(), String> {
    if let Some(set) = t.hyper.set(k, v) {
        return set;
    }
    match k {
        "classes" => t.classes = Some(list(v)?),
        "labels" => t.labels = Some(v.split(',').map(str::to_string).collect()),
        "test_fraction" => t.test_fraction = Some(one(v)?),
        "train_per_class" => t.train_per_class = Some(one(v)?),
        "resize" => t.preprocessing.resize = Some(crate::data::parse_hw(v)?),
        "channels" => t.preprocessing.channels = Some(one(v)?),
        "mean" => t.preprocessing.mean = list(v)?,
        "std" => t.preprocessing.std = list(v)?,
        "layout" => t.preprocessing.layout = Some(v.parse()?),
        _ => {
            let task = [
                "classes",
                "labels",
                "test_fraction",
                "train_per_class",
                "resize",
                "channels",
                "mean",
                "std",
                "layout",
            ];
            return Err(format!("unknown option ({})", [Hyper::KEYS, &task].concat().join(", ")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_spec_with_options() {
        let t = parse_task("fm=data/fm.safetensors:epochs=3:lr=0.001:resize=64x64:channels=3:classes=0,1,2").unwrap();
        assert_eq!(t.name, "fm");
        assert_eq!(t.hyper.epochs, Some(3));
        assert_eq!(t.preprocessing.resize, Some([64, 64]));
        assert_eq!(t.classes, Some(vec![0, 1, 2]));
        assert!(parse_task("fm").is_err());
        assert!(parse_task("fm=x:bogus=1").unwrap_err().contains("unknown option"));
        assert!(parse_task("fm=x:epochs=two").unwrap_err().contains("epochs"));
    }

    #[test]
    fn a_plan_json_cannot_hold_has_no_digest_rather_than_a_shared_one() {
        use std::os::unix::ffi::OsStrExt;
        let mut p = Plan::from_toml("method = \"lwf\"\n[[task]]\nname = \"a\"\ndataset = \"a\"\n").unwrap();
        assert_eq!(p.digest().unwrap().len(), 64);
        p.tasks[0].dataset = PathBuf::from(std::ffi::OsStr::from_bytes(b"data/\xff.safetensors"));
        assert!(p.digest().is_err());
    }

    #[test]
    fn an_optimizer_is_one_of_the_known_names() {
        use crate::train::OptimizerName;
        assert_eq!(parse_task("a=x:optimizer=adam").unwrap().hyper.optimizer, Some(OptimizerName::Adamw));
        assert!(parse_task("a=x:optimizer=rmsprop").unwrap_err().contains("'rmsprop' is not sgd or adamw"));
        let plan = |name: &str| {
            Plan::from_toml(&format!(
                "method = \"finetune\"\n[defaults]\noptimizer = \"{name}\"\n[[task]]\nname = \"a\"\ndataset = \"a\"\n"
            ))
        };
        assert_eq!(plan("sgd").unwrap().defaults.optimizer, Some(OptimizerName::Sgd));
        assert!(plan("rmsprop").unwrap_err().contains("rmsprop"));
        // Written back under its own name.
        assert!(toml::to_string(&plan("adam").unwrap()).unwrap().contains("optimizer = \"adamw\""));
    }

    #[test]
    fn toml_plan_round_trip_and_validation() {
        let text = r#"
            method = "ewc"
            seed = 3
            [defaults]
            epochs = 1
            lr = 0.005
            [params]
            ewc_lambda = 100.0
            [[task]]
            name = "a"
            dataset = "a.safetensors"
            [[task]]
            name = "b"
            dataset = "b.safetensors"
            batch = 16
            preprocessing = { resize = [64, 64], channels = 3 }
        "#;
        let p = Plan::from_toml(text).unwrap();
        p.validate().unwrap();
        assert_eq!(p.tasks[1].hyper.over(&p.defaults).resolve("b").unwrap().batch, 16);
        let mut dup = p.clone();
        dup.tasks[1].name = "a".into();
        assert!(dup.validate().unwrap_err().contains("used twice"));
        assert!(Plan::from_toml("method = \"nope\"\ntask = []").unwrap_err().contains("unknown variant"));
    }

    #[test]
    fn bf16_products_are_refused_off_mtpack_cpu_kernels() {
        let mut p = Plan::new(None, MethodKind::Finetune, default_tasks());
        p.precision = Precision::Bf16;
        p.kernels = Kernels::Portable;
        assert!(p.validate().unwrap_err().contains("--precision bf16"));
        p.kernels = Kernels::Native;
        p.device = DeviceChoice::Cuda;
        assert!(p.validate().unwrap_err().contains("--device cuda"));
    }

    #[test]
    fn lwf_on_a_batchnorm_backbone_defaults_to_frozen_statistics_at_a_lower_lr() {
        let bn = crate::onnx::Model::load(&crate::plan::default_backbone()).unwrap();
        let plan = |method: MethodKind, mode: Option<BatchNormMode>, lr: Option<f64>| Plan {
            backbone: None,
            method,
            seed: 0,
            device: Default::default(),
            kernels: Default::default(),
            precision: Default::default(),
            batchnorm: mode,
            at: None,
            pool: None,
            layout: None,
            bn_recalibrate: None,
            linear_probe_epochs: None,
            tune: None,
            defaults: Hyper { lr, ..Hyper::default() },
            params: Default::default(),
            tasks: crate::plan::default_tasks(),
        };
        // Frozen statistics: the probe is on, and the backbone trains at the probed rate.
        let lwf = plan(MethodKind::Lwf, None, None).for_backbone(&bn);
        assert_eq!((lwf.batchnorm, lwf.defaults.lr), (Some(BatchNormMode::Frozen), Some(FROZEN_BN_PROBED_LR)));
        assert_eq!((lwf.linear_probe_epochs, lwf.bn_recalibrate), (Some(LINEAR_PROBE_EPOCHS), Some(false)));
        let unprobed = Plan { linear_probe_epochs: Some(0), ..plan(MethodKind::Lwf, None, None) }.for_backbone(&bn);
        assert_eq!(unprobed.defaults.lr, Some(FROZEN_BN_LR));
        // Set by the user: kept as given.
        let given = plan(MethodKind::Lwf, Some(BatchNormMode::Batch), None).for_backbone(&bn);
        assert_eq!((given.batchnorm, given.defaults.lr), (Some(BatchNormMode::Batch), None));
        let lr = plan(MethodKind::Lwf, None, Some(0.05)).for_backbone(&bn);
        assert_eq!(lr.defaults.lr, Some(0.05));
        // Batch statistics: recalibrated, no probe.
        let ft = plan(MethodKind::Finetune, None, None).for_backbone(&bn);
        assert_eq!((ft.batchnorm, ft.defaults.lr), (Some(BatchNormMode::Batch), None));
        assert_eq!((ft.linear_probe_epochs, ft.bn_recalibrate), (Some(0), Some(true)));
        let frozen_ft = plan(MethodKind::Finetune, Some(BatchNormMode::Frozen), None).for_backbone(&bn);
        assert_eq!(frozen_ft.defaults.lr, Some(FROZEN_BN_PROBED_LR));
        // Feature extraction trains no backbone: no probe.
        let fe = plan(MethodKind::FeatureExtract, Some(BatchNormMode::Frozen), None).for_backbone(&bn);
        assert_eq!((fe.linear_probe_epochs, fe.bn_recalibrate), (Some(0), Some(false)));
        // No BatchNorm: nothing to recalibrate.
        let plain = crate::onnx::build::model(Default::default(), 13);
        assert_eq!(plan(MethodKind::Finetune, None, None).for_backbone(&plain).bn_recalibrate, Some(false));
        // Piggyback keeps its own learning rate, and by default the backbone's BatchNorm.
        let pb = plan(MethodKind::Piggyback, Some(BatchNormMode::Frozen), None).for_backbone(&bn);
        assert_eq!(pb.defaults.lr, None);
        let pb = plan(MethodKind::Piggyback, None, None).for_backbone(&bn);
        assert_eq!((pb.linear_probe_epochs, pb.bn_recalibrate), (Some(LINEAR_PROBE_EPOCHS), Some(false)));
        let mut own = plan(MethodKind::Piggyback, None, None);
        own.params.piggyback.piggyback_shared = Some(crate::methods::SharedParams::PerTask);
        let own = own.for_backbone(&bn);
        assert_eq!((own.linear_probe_epochs, own.bn_recalibrate), (Some(0), Some(true)));
        // Whether BatchNorm trains with batch statistics (what the below-probe warning and
        // the probe's recalibration go by): not for Piggyback's default, despite mode batch.
        assert_eq!(pb.batchnorm_mode(), BatchNormMode::Batch);
        assert!(!pb.trains_batch_statistics() && own.trains_batch_statistics());
        assert!(ft.trains_batch_statistics() && !frozen_ft.trains_batch_statistics() && !lwf.trains_batch_statistics());
        // Resolving twice changes nothing (a resumed pack's plan is already resolved).
        assert_eq!(lwf.for_backbone(&bn), lwf);
    }
}
