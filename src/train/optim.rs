//! Optimizers: SGD with momentum (PyTorch semantics: coupled weight decay, dampening 0) and
//! AdamW (decoupled weight decay). Both honour per-parameter masks: a masked-out weight
//! gets neither a gradient nor a momentum, Adam or weight-decay update, so frozen weights stay
//! bit-for-bit unchanged.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::{adamw_in_place, sgd_in_place};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimKind {
    Sgd { momentum: f64, nesterov: bool },
    Adamw { beta1: f64, beta2: f64, eps: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    #[serde(flatten)]
    pub kind: OptimKind,
    pub lr: f64,
    pub weight_decay: f64,
}

impl OptimConfig {
    pub fn sgd(lr: f64, momentum: f64, weight_decay: f64) -> OptimConfig {
        OptimConfig { kind: OptimKind::Sgd { momentum, nesterov: false }, lr, weight_decay }
    }

    pub fn adamw(lr: f64, weight_decay: f64) -> OptimConfig {
        OptimConfig { kind: OptimKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, lr, weight_decay }
    }
}

/// Step learning-rate schedule: lr * gamma^(epoch / step_epochs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLr {
    pub step_epochs: u64,
    pub gamma: f64,
}

impl StepLr {
    pub fn none() -> StepLr {
        StepLr { step_epochs: 0, gamma: 1.0 }
    }

    pub fn lr_at(&self, base: f64, epoch: u64) -> f64 {
        match epoch.checked_div(self.step_epochs) {
            Some(steps) => base * self.gamma.powi(steps as i32),
            None => base,
        }
    }
}

pub struct Optimizer {
    pub config: OptimConfig,
    /// First moment (momentum buffer for SGD) and second moment per parameter.
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    pub steps: u64,
    /// Whether SGD with momentum may update in place (tests turn it off to compare).
    in_place: bool,
}

impl Optimizer {
    pub fn new(config: OptimConfig) -> Optimizer {
        Optimizer { config, m: HashMap::new(), v: HashMap::new(), steps: 0, in_place: true }
    }

    /// One update of every parameter that has a gradient. `masks` (1 = may change, 0 =
    /// frozen) multiply both the gradient and the final update.
    pub fn step(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &GradStore,
        lr: f64,
        masks: &HashMap<String, Tensor>,
    ) -> candle_core::Result<()> {
        self.step_scaled(params, grads, lr, masks, None)
    }

    /// `step` with the learning rate of each parameter in `scales` multiplied by its factor.
    pub fn step_scaled(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &GradStore,
        base_lr: f64,
        masks: &HashMap<String, Tensor>,
        scales: Option<&HashMap<String, f64>>,
    ) -> candle_core::Result<()> {
        self.steps += 1;
        for (name, var) in params {
            // Detached: a gradient computed from a Var (a MatMul weight's) carries an op graph,
            // and a momentum buffer built from it would chain every step's buffers together
            // (ViT-S training grew by ~300 MB a step until the OOM killer stopped it).
            let Some(g) = grads.get(var.as_tensor()).map(Tensor::detach) else { continue };
            let lr = base_lr * scales.and_then(|s| s.get(name)).copied().unwrap_or(1.0);
            let mask = masks.get(name);
            let g = match mask {
                Some(m) => g.mul(m)?,
                None => g.clone(),
            };
            let w = var.as_tensor();
            if let OptimKind::Sgd { momentum, nesterov: false } = self.config.kind {
                if momentum != 0.0 && self.in_place && sgd_in_place::applies(w, &g, self.m.get(name), mask) {
                    let hyper = (momentum, self.config.weight_decay, lr);
                    if let Some(fresh) = sgd_in_place::step(var, &g, self.m.get(name), mask, hyper)? {
                        self.m.insert(name.to_string(), fresh);
                    }
                    continue;
                }
            }
            if let OptimKind::Adamw { beta1, beta2, eps } = self.config.kind {
                let moments = [self.m.get(name), self.v.get(name)];
                if let Some(mv) = adamw_in_place::moments(w, &g, moments, mask.is_some()).filter(|_| self.in_place) {
                    let t = self.steps as i32;
                    adamw_in_place::step(var, &g, mv, (beta1, beta2, eps), (t, self.config.weight_decay, lr))?;
                    continue;
                }
            }
            let update = match self.config.kind {
                OptimKind::Sgd { momentum, nesterov } => self.sgd_update(name, g, w, (momentum, nesterov), lr)?,
                OptimKind::Adamw { beta1, beta2, eps } => self.adamw_update(name, &g, w, (beta1, beta2, eps), lr)?,
            };
            let update = match mask {
                Some(m) => update.mul(m)?,
                None => update,
            };
            var.set(&w.sub(&update)?)?;
        }
        Ok(())
    }

    /// SGD's step for one parameter: weight decay coupled into the gradient, then momentum
    /// (PyTorch's form: the buffer accumulates gradients, the learning rate scales the result).
    fn sgd_update(
        &mut self,
        name: &str,
        g: Tensor,
        w: &Tensor,
        (momentum, nesterov): (f64, bool),
        lr: f64,
    ) -> candle_core::Result<Tensor> {
        let wd = self.config.weight_decay;
        let d = if wd != 0.0 { (&g + w.affine(wd, 0.0)?)? } else { g };
        let d = if momentum != 0.0 {
            let buf = match self.m.get(name) {
                Some(b) => (b.affine(momentum, 0.0)? + &d)?,
                None => d.clone(),
            };
            self.m.insert(name.to_string(), buf.detach());
            if nesterov {
                (d + buf.affine(momentum, 0.0)?)?
            } else {
                buf
            }
        } else {
            d
        };
        d.affine(lr, 0.0)
    }

    /// AdamW's step for one parameter: bias-corrected moments, decoupled weight decay.
    fn adamw_update(
        &mut self,
        name: &str,
        g: &Tensor,
        w: &Tensor,
        (beta1, beta2, eps): (f64, f64, f64),
        lr: f64,
    ) -> candle_core::Result<Tensor> {
        let m = match self.m.get(name) {
            Some(m) => (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?,
            None => g.affine(1.0 - beta1, 0.0)?,
        };
        let v = match self.v.get(name) {
            Some(v) => (v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?,
            None => g.sqr()?.affine(1.0 - beta2, 0.0)?,
        };
        self.m.insert(name.to_string(), m.detach());
        self.v.insert(name.to_string(), v.detach());
        let t = self.steps as i32;
        let mhat = m.affine(1.0 / (1.0 - beta1.powi(t)), 0.0)?;
        let vhat = v.affine(1.0 / (1.0 - beta2.powi(t)), 0.0)?;
        let adam = mhat.div(&(vhat.sqrt()? + eps)?)?;
        let wd = self.config.weight_decay;
        let adam = if wd != 0.0 { (adam + w.affine(wd, 0.0)?)? } else { adam };
        adam.affine(lr, 0.0)
    }

    /// Optimizer state for checkpoints: "m/<param>", "v/<param>".
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.m.iter().map(|(k, t)| (format!("m/{k}"), t.clone())).collect();
        v.extend(self.v.iter().map(|(k, t)| (format!("v/{k}"), t.clone())));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn load_state(&mut self, state: Vec<(String, Tensor)>, steps: u64) {
        self.steps = steps;
        for (k, t) in state {
            if let Some(p) = k.strip_prefix("m/") {
                self.m.insert(p.to_string(), t);
            } else if let Some(p) = k.strip_prefix("v/") {
                self.v.insert(p.to_string(), t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quadratic_step(cfg: OptimConfig, mask: Option<Tensor>, steps: usize) -> Vec<f64> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f64, -2.0, 3.0], &dev).unwrap();
        let params = BTreeMap::from([("w".to_string(), w.clone())]);
        let masks: HashMap<String, Tensor> = mask.into_iter().map(|m| ("w".to_string(), m)).collect();
        let mut opt = Optimizer::new(cfg);
        for _ in 0..steps {
            // loss = sum(w^2) / 2, gradient = w
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap().affine(0.5, 0.0).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&params, &grads, cfg.lr, &masks).unwrap();
        }
        w.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn optimizer_state_holds_no_graph_between_steps() {
        // The gradient of a Var-weight product carries an op graph; state built from it must not.
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f64, -2.0], [0.5, 3.0]], &dev).unwrap();
        let x = Var::new(&[[1.0f64, 2.0]], &dev).unwrap();
        let params = BTreeMap::from([("w".to_string(), w.clone()), ("x".to_string(), x.clone())]);
        for kind in [OptimConfig::sgd(0.1, 0.9, 0.01), OptimConfig::adamw(0.1, 0.01)] {
            let mut opt = Optimizer::new(kind);
            for _ in 0..2 {
                let grads = x.as_tensor().matmul(w.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
                opt.step(&params, &grads, 0.1, &HashMap::new()).unwrap();
            }
            for (name, t) in opt.state() {
                assert!(!t.track_op(), "{name} keeps an op graph alive");
            }
        }
    }

    #[test]
    fn sgd_momentum_matches_the_recurrence() {
        // w1 = w0 - lr*g0; buf1 = 0.9*g0 + g1; w2 = w1 - lr*buf1, with g = w.
        let got = quadratic_step(OptimConfig::sgd(0.1, 0.9, 0.0), None, 2);
        let w0 = 1.0f64;
        let w1 = w0 - 0.1 * w0;
        let w2 = w1 - 0.1 * (0.9 * w0 + w1);
        assert!((got[0] - w2).abs() < 1e-12, "{got:?}");
    }

    #[test]
    fn in_place_steps_equal_the_tensor_expressions_bit_for_bit() {
        // One part, and several parts of the pool's split with a shorter last one.
        for (rows, cols) in [(3, 5), (97, 171)] {
            in_place_matches_on(rows, cols);
        }
    }

    fn in_place_matches_on(rows: usize, cols: usize) {
        let dev = Device::Cpu;
        let start = Tensor::randn(0f32, 1f32, (rows, cols), &dev).unwrap();
        let x = Tensor::randn(0f32, 1f32, (cols, 2), &dev).unwrap();
        let half: Vec<f32> = (0..rows * cols).map(|i| (i % 2) as f32).collect();
        let half = Tensor::from_vec(half, (rows, cols), &dev).unwrap();
        let configs = [
            OptimConfig::sgd(0.05, 0.9, 0.0),
            OptimConfig::sgd(0.05, 0.9, 0.01),
            OptimConfig::adamw(0.05, 0.0),
            OptimConfig::adamw(0.05, 0.01),
        ];
        for cfg in configs {
            for mask in [None, Some(half.clone())] {
                let run = |in_place: bool| {
                    let w = Var::from_tensor(&start.copy().unwrap()).unwrap();
                    let params = BTreeMap::from([("w".to_string(), w.clone())]);
                    let masks: HashMap<String, Tensor> = mask.iter().map(|m| ("w".to_string(), m.clone())).collect();
                    let mut opt = Optimizer::new(cfg);
                    opt.in_place = in_place;
                    for _ in 0..4 {
                        let loss = w.as_tensor().matmul(&x).unwrap().tanh().unwrap().sum_all().unwrap();
                        opt.step(&params, &loss.backward().unwrap(), cfg.lr, &masks).unwrap();
                    }
                    let buf = opt.state().into_iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    (w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), buf.collect::<Vec<_>>())
                };
                let (in_place, expressions) = (run(true), run(false));
                let moved = start.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_ne!(in_place.0, moved, "the weights moved");
                if mask.is_some() {
                    let kept = in_place.0.iter().zip(&moved).step_by(2).all(|(a, b)| a == b);
                    assert!(kept, "masked weights stay: {cfg:?}");
                }
                assert_eq!(in_place, expressions, "{cfg:?} mask {}", mask.is_some());
            }
        }
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // Bias-corrected first Adam step is lr * sign(g) (plus decoupled decay).
        let got = quadratic_step(OptimConfig::adamw(0.01, 0.0), None, 1);
        assert!((got[0] - 0.99).abs() < 1e-6 && (got[1] + 1.99).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn masked_weights_never_move_under_momentum_and_decay() {
        let mask = Tensor::new(&[1.0f64, 0.0, 1.0], &Device::Cpu).unwrap();
        for cfg in [OptimConfig::sgd(0.1, 0.9, 0.01), OptimConfig::adamw(0.1, 0.1)] {
            let got = quadratic_step(cfg, Some(mask.clone()), 5);
            assert_eq!(got[1], -2.0, "{cfg:?}");
            assert_ne!(got[0], 1.0);
        }
    }

    #[test]
    fn step_schedule() {
        let s = StepLr { step_epochs: 2, gamma: 0.1 };
        assert_eq!(s.lr_at(1.0, 1), 1.0);
        assert!((s.lr_at(1.0, 2) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(1.0, 5) - 0.01).abs() < 1e-12);
    }
}
