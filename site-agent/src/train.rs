//! Local training with candle-core on the CPU: logistic regression and MLPs,
//! minibatch SGD or Adam on binary cross-entropy.
//!
//! The global model arrives on raw feature coordinates. Training runs on features
//! standardized with this site's own statistics (better conditioned), and the result
//! is mapped back to raw coordinates before the update leaves (see
//! [`Standardizer`]); the statistics themselves never leave the site.
//!
//! The study's initial model is the exception: its weights are scaled for unit-variance
//! inputs (±1/√fan_in), so it is read on standardized coordinates ([`Start::Initial`]).
//! Round 1's aggregate is then the weighted mean of the sites' raw-coordinate models,
//! and every later global model is on raw coordinates ([`Start::Global`]).

use candle_core::{DType, Device, Tensor, Var};
use medfl_shared::manifest::{Optimizer, Training};
use medfl_shared::model::Standardizer;

use crate::problem::{ADAM_EPS, BETA1, BETA2, layer_vars, loss_rows, targets};
pub use crate::problem::{LocalProblem, Start, TrainOutcome};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

fn forward(layers: &[(Var, Var)], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for (i, (w, b)) in layers.iter().enumerate() {
        h = h.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    Ok(h)
}

/// A local training problem on the training scale: rows (n × d) and labels as tensors,
/// and the starting model as variables (`start` flat).
struct Problem {
    x: Tensor,
    y: Tensor,
    layers: Vec<(Var, Var)>,
    start: Vec<f32>,
}

impl Problem {
    /// Rows `x` (raw) and the model `params` (raw, or standardized for the initial model)
    /// on the scale `scaling` sets.
    fn new(local: &LocalProblem<'_>, scaling: &Standardizer) -> candle_core::Result<Self> {
        let LocalProblem {
            spec,
            n_features,
            params,
            start_on,
            x,
            y,
            ..
        } = *local;
        let io = local.io();
        let dev = Device::Cpu;
        let mut xs = x.to_vec();
        scaling.apply(&mut xs);
        let mut start = params.to_vec();
        if start_on == Start::Global {
            scaling.raw_to_standardized(spec, &mut start);
        }
        Ok(Problem {
            x: Tensor::from_slice(&xs, (y.len(), n_features), &dev)?,
            y: targets(y, io.outputs, &dev)?,
            layers: layer_vars(spec, io, &start, &dev)?,
            start,
        })
    }
}

/// Minibatch epochs of `cfg` over `(x_all, y_all)` (`n` rows, shuffled by `seed`): for
/// each batch, each variable's gradient goes to `update(index, var, grad, step)` (step
/// counts batches from 1). Returns the mean loss of the last epoch and the steps taken.
fn epochs(
    layers: &[(Var, Var)],
    x_all: &Tensor,
    y_all: &Tensor,
    cfg: &Training,
    seed: u64,
    mut update: impl FnMut(usize, &Var, &Tensor, i32) -> candle_core::Result<()>,
) -> candle_core::Result<(f64, i32)> {
    let dev = Device::Cpu;
    let n = y_all.dims()[0];
    let vars: Vec<&Var> = layers.iter().flat_map(|(w, b)| [w, b]).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let batch = (cfg.batch_size as usize).clamp(1, n.max(1));
    let mut step = 0i32;
    let mut last_epoch_loss = 0.0;
    for _ in 0..cfg.local_epochs {
        order.shuffle(&mut rng);
        let (mut epoch_loss, mut batches) = (0.0, 0);
        for idx in order.chunks(batch) {
            let idx = Tensor::from_slice(idx, idx.len(), &dev)?;
            let xb = x_all.index_select(&idx, 0)?;
            let yb = y_all.index_select(&idx, 0)?;
            let loss = loss_rows(&forward(layers, &xb)?, &yb)?.mean_all()?;
            epoch_loss += loss.to_scalar::<f32>()? as f64;
            batches += 1;
            let grads = loss.backward()?;
            step += 1;
            for (i, var) in vars.iter().enumerate() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    update(i, var, g, step)?;
                }
            }
        }
        last_epoch_loss = epoch_loss / batches.max(1) as f64;
    }
    Ok((last_epoch_loss, step))
}

/// The layers' values, flat in the model layout's order (each layer's weight, then bias).
fn flatten(layers: &[(Var, Var)]) -> candle_core::Result<Vec<f32>> {
    let mut out = Vec::new();
    for (w, b) in layers {
        out.extend(w.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        out.extend(b.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Trains from the problem's starting model on its rows; returns the new model on raw
/// coordinates.
pub fn train(local: &LocalProblem<'_>, seed: u64) -> candle_core::Result<TrainOutcome> {
    if local.spec.kind == medfl_shared::model::ModelKind::Cnn {
        return crate::cnn::train(local, seed);
    }
    let (spec, cfg) = (local.spec, local.training);
    let n = local.y.len();
    let standardizer = Standardizer::fit(local.x, local.n_features);
    let problem = Problem::new(local, &standardizer)?;
    let (x_all, y_all, layers) = (&problem.x, &problem.y, &problem.layers);
    let vars: Vec<&Var> = layers.iter().flat_map(|(w, b)| [w, b]).collect();
    // FedProx: the gradient of μ/2 ‖w − w_t‖² is μ (w − w_t), w_t the starting model.
    let mu = cfg.proximal_mu.unwrap_or(0.0);
    let anchors: Vec<Tensor> = if mu > 0.0 {
        vars.iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?
    } else {
        Vec::new()
    };
    let mut moments: Vec<(Tensor, Tensor)> = vars
        .iter()
        .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
        .collect::<candle_core::Result<_>>()?;
    let lr = cfg.learning_rate;
    let (loss, _) = epochs(layers, x_all, y_all, cfg, seed, |i, var, g, step| {
        let prox;
        let g = match anchors.get(i) {
            Some(anchor) => {
                prox = (g + ((var.as_tensor() - anchor)? * mu)?)?;
                &prox
            }
            None => g,
        };
        match cfg.optimizer {
            Optimizer::Sgd => var.set(&(var.as_tensor() - g.affine(lr, 0.0)?)?),
            Optimizer::Adam => {
                let (m, v) = &mut moments[i];
                *m = ((&*m * BETA1)? + (g * (1.0 - BETA1))?)?;
                *v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                let m_hat = (&*m / (1.0 - BETA1.powi(step)))?;
                let v_hat = (&*v / (1.0 - BETA2.powi(step)))?;
                let delta = (m_hat / (v_hat.sqrt()? + ADAM_EPS)?)?;
                var.set(&(var.as_tensor() - (delta * lr)?)?)
            }
        }
    })?;
    let mut out = flatten(layers)?;
    standardizer.standardized_to_raw(spec, &mut out);
    Ok(TrainOutcome {
        params: out,
        loss,
        examples: n,
    })
}

/// SCAFFOLD's local training (Karimireddy et al., ICML 2020, Algorithm 1, lines 9–12,
/// option II): K plain SGD steps `y ← y − η_l (g_i(y) − c_i + c)` on the study's public
/// feature scale (every site's control variate must be on the same coordinates), then
/// `c_i⁺ = c_i − c + (x − y)/(K η_l)`. `c` and `c_i` are on that scale; returns the
/// new model on raw coordinates and c_i⁺.
pub fn train_scaffold(
    local: &LocalProblem<'_>,
    scaling: &Standardizer,
    c: &[f32],
    c_i: &[f32],
    seed: u64,
) -> candle_core::Result<(TrainOutcome, Vec<f32>)> {
    let dev = Device::Cpu;
    let (spec, cfg) = (local.spec, local.training);
    let n = local.y.len();
    let problem = Problem::new(local, scaling)?;
    let (x_all, y_all, layers, start) = (&problem.x, &problem.y, &problem.layers, &problem.start);
    // The drift correction c − c_i, cut to each variable (flat in the layout's order).
    let mut corrections = Vec::new();
    let mut offset = 0;
    for var in layers.iter().flat_map(|(w, b)| [w, b]) {
        let len = var.as_tensor().elem_count();
        let part: Vec<f32> = (offset..offset + len).map(|j| c[j] - c_i[j]).collect();
        corrections.push(Tensor::from_slice(&part, var.as_tensor().shape(), &dev)?);
        offset += len;
    }
    let lr = cfg.learning_rate;
    let (loss, steps) = epochs(layers, x_all, y_all, cfg, seed, |i, var, g, _| {
        var.set(&(var.as_tensor() - ((g + &corrections[i])? * lr)?)?)
    })?;
    let mut out = flatten(layers)?;
    let scale = 1.0 / (steps.max(1) as f64 * lr) as f32;
    let c_next: Vec<f32> = (0..out.len())
        .map(|j| c_i[j] - c[j] + (start[j] - out[j]) * scale)
        .collect();
    scaling.standardized_to_raw(spec, &mut out);
    Ok((
        TrainOutcome {
            params: out,
            loss,
            examples: n,
        },
        c_next,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_shared::metrics::accuracy;
    use medfl_shared::model::ModelKind;
    use medfl_shared::model::ModelSpec;

    /// Two Gaussian blobs on very different feature scales.
    fn blobs() -> (Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(3);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..400 {
            let label = (i % 2) as f32;
            let noise = |r: &mut StdRng| rand::Rng::random_range(r, -1.0f32..1.0);
            x.push(1000.0 + 300.0 * label + 200.0 * noise(&mut rng));
            x.push(0.01 + 0.004 * label + 0.003 * noise(&mut rng));
            y.push(label);
        }
        (x, y)
    }

    #[test]
    fn fedprox_keeps_local_training_near_the_global_model() {
        // Li et al. 2020: the proximal term μ/2‖w − w_t‖² pulls the local solution toward
        // the model the round started from; the larger μ, the smaller the update.
        let (x, y) = blobs();
        let spec = ModelSpec {
            kind: ModelKind::LogisticRegression,
            hidden: vec![],
            external: None,
            input: None,
            conv: Vec::new(),
            checkpoint: None,
            lora: None,
        };
        let start = spec.init(2, 1);
        let distance = |mu: Option<f64>| {
            let cfg = Training {
                local_epochs: 5,
                batch_size: 32,
                learning_rate: 0.05,
                optimizer: Optimizer::Sgd,
                proximal_mu: mu,
            };
            // From the initial model (standardized scale), compared on that scale.
            let local = LocalProblem {
                spec: &spec,
                n_features: 2,
                outputs: 1,
                params: &start,
                start_on: Start::Initial,
                x: &x,
                y: &y,
                persons: &[],
                training: &cfg,
                base: None,
            };
            let out = train(&local, 7).expect("training runs");
            let mut params = out.params;
            Standardizer::fit(&x, 2).raw_to_standardized(&spec, &mut params);
            params
                .iter()
                .zip(&start)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let (free, held) = (distance(None), distance(Some(5.0)));
        assert!(held < 0.5 * free, "μ = 5 moved {held}, μ = 0 moved {free}");
    }

    #[test]
    fn logistic_regression_and_mlp_learn_separable_data() {
        let (x, y) = blobs();
        for spec in [
            ModelSpec {
                kind: ModelKind::LogisticRegression,
                hidden: vec![],
                external: None,
                input: None,
                conv: Vec::new(),
                checkpoint: None,
                lora: None,
            },
            ModelSpec {
                kind: ModelKind::Mlp,
                hidden: vec![8],
                external: None,
                input: None,
                conv: Vec::new(),
                checkpoint: None,
                lora: None,
            },
        ] {
            let init = spec.init(2, 1);
            let cfg = Training {
                local_epochs: 5,
                batch_size: 32,
                learning_rate: 0.05,
                optimizer: Optimizer::Adam,
                proximal_mu: None,
            };
            let local = LocalProblem {
                spec: &spec,
                n_features: 2,
                outputs: 1,
                params: &init,
                start_on: Start::Initial,
                x: &x,
                y: &y,
                persons: &[],
                training: &cfg,
                base: None,
            };
            let out = train(&local, 7).expect("training runs");
            // Continuing from the raw-coordinate result keeps the model good.
            let again = train(
                &LocalProblem {
                    params: &out.params,
                    start_on: Start::Global,
                    ..local
                },
                8,
            )
            .expect("training runs");
            let probs = spec.predict_proba(&again.params, &x, 2).expect("valid model");
            assert!(
                accuracy(&probs, &y) > 0.85,
                "{:?} lost accuracy when continuing",
                spec.kind
            );
            let probs = spec.predict_proba(&out.params, &x, 2).expect("valid model");
            let acc = accuracy(&probs, &y);
            assert!(acc > 0.85, "{:?} reached only {acc}", spec.kind);
            assert!(out.loss < 0.5, "loss {}", out.loss);
        }
    }
}
