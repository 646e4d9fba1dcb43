//! Record-level DP-SGD (Abadi et al., CCS 2016, Algorithm 1) for the supported models:
//! per-example gradients clipped to L2 norm C, summed, Gaussian noise of std σ·C added
//! through [`medfl_shared::dp`], divided by the expected batch size q·n.
//!
//! Per-example gradients are computed vectorized, never as a loop of single-example
//! backward passes. For a dense layer the per-example weight gradient is the outer
//! product δᵢ aᵢᵀ of the layer's output gradient and its input, so its squared norm is
//! ‖δᵢ‖²‖aᵢ‖² and, with the bias, ‖δᵢ‖²(‖aᵢ‖² + 1) (Goodfellow, "Efficient
//! per-example gradient computations", arXiv:1510.01799, 2015). The clipped sum of
//! the weight gradients is then one matrix product per layer, (c ⊙ δ)ᵀ a.
//! [`clipped_gradient_sum_looped`] is the slow reference, kept for the equality test
//! and the throughput comparison.

use candle_core::{Device, Tensor};
use medfl_shared::model::{Io, ModelSpec};

pub use crate::problem::ClippedBatch;
use crate::problem::{LocalProblem, layer_tensors, loss_rows, output_delta, targets};

/// Vectorized: one forward and one backward pass over the batch, per-example norms
/// by the outer-product identity, clipping factors, and the clipped sum by matmuls.
/// `io` is the input width (a binary model) or the input and output widths; labels
/// are 0/1 or class indices.
pub fn clipped_gradient_sum(
    spec: &ModelSpec,
    io: impl Into<Io>,
    params: &[f32],
    x: &[f32],
    y: &[f32],
    clip: f64,
) -> candle_core::Result<ClippedBatch> {
    let io: Io = io.into();
    if spec.kind == medfl_shared::model::ModelKind::Cnn {
        // A conv layer has no outer-product shortcut: micro-batches of one example.
        return crate::cnn::clipped_gradient_sum(spec, io, None, params, x, y, clip);
    }
    let dev = Device::Cpu;
    let rows = y.len();
    if rows == 0 {
        return Ok(ClippedBatch {
            sum: vec![0.0; params.len()],
            mean_loss: 0.0,
            rows: 0,
            clipped: 0,
        });
    }
    let d = io.inputs;
    let layers = layer_tensors(spec, io, params, &dev)?;
    let yb = targets(y, io.outputs, &dev)?;
    // Forward, keeping each layer's input and pre-activation.
    let mut inputs = vec![Tensor::from_slice(x, (rows, d), &dev)?];
    let mut pre = Vec::with_capacity(layers.len());
    for (i, (w, b)) in layers.iter().enumerate() {
        let z = inputs[i].matmul(&w.t()?)?.broadcast_add(b)?;
        if i + 1 < layers.len() {
            inputs.push(z.relu()?);
        }
        pre.push(z);
    }
    let logits = &pre[layers.len() - 1];
    let mean_loss = loss_rows(logits, &yb)?.mean_all()?.to_scalar::<f32>()? as f64;
    // Backward: δ_L = σ(z_L) − y (softmax(z_L) − onehot(y) for several classes),
    // δ_{l−1} = (δ_l W_l) ⊙ 1[z_{l−1} > 0].
    let mut deltas = vec![output_delta(logits, &yb)?];
    for l in (1..layers.len()).rev() {
        let back = deltas[0].matmul(&layers[l].0)?;
        let mask = pre[l - 1].gt(0.0)?.to_dtype(candle_core::DType::F32)?;
        deltas.insert(0, (back * mask)?);
    }
    // ‖gᵢ‖² = Σ_l ‖δ_l,i‖² (‖a_{l−1},i‖² + 1).
    let mut norms2 = Tensor::zeros(rows, candle_core::DType::F32, &dev)?;
    for (delta, input) in deltas.iter().zip(&inputs) {
        let dn = delta.sqr()?.sum(1)?;
        let an = (input.sqr()?.sum(1)? + 1.0)?;
        norms2 = (norms2 + (dn * an)?)?;
    }
    let norms: Vec<f32> = norms2.sqrt()?.to_vec1()?;
    let factors: Vec<f32> = norms
        .iter()
        .map(|n| medfl_shared::dp::clip_factor(*n as f64, clip) as f32)
        .collect();
    let clipped = factors.iter().filter(|f| **f < 1.0).count();
    let c = Tensor::from_slice(&factors, (rows, 1), &dev)?;
    let mut sum = Vec::with_capacity(params.len());
    for (delta, input) in deltas.iter().zip(&inputs) {
        let scaled = delta.broadcast_mul(&c)?;
        sum.extend(scaled.t()?.matmul(input)?.flatten_all()?.to_vec1::<f32>()?);
        sum.extend(scaled.sum(0)?.to_vec1::<f32>()?);
    }
    Ok(ClippedBatch {
        sum,
        mean_loss,
        rows,
        clipped,
    })
}

/// The reference: a separate autograd backward pass per example, then clip and sum.
pub fn clipped_gradient_sum_looped(
    spec: &ModelSpec,
    io: impl Into<Io>,
    params: &[f32],
    x: &[f32],
    y: &[f32],
    clip: f64,
) -> candle_core::Result<ClippedBatch> {
    let each: Vec<Vec<usize>> = (0..y.len()).map(|r| vec![r]).collect();
    clipped_person_sums(spec, io.into(), None, params, x, y, &each, clip)
}

/// Per-person clipping, for a dataset whose persons may have several rows (an image
/// dataset's patients): each person's rows through one backward pass of their summed
/// loss, that gradient clipped to `clip` as one contribution, then summed. A conv net
/// goes to [`crate::cnn::clipped_person_sums`], over the checkpoint `base` where the
/// study fine-tunes one (`None` otherwise; only conv nets fine-tune).
#[allow(clippy::too_many_arguments)]
pub fn clipped_person_sums(
    spec: &ModelSpec,
    io: Io,
    base: Option<&[f32]>,
    params: &[f32],
    x: &[f32],
    y: &[f32],
    persons: &[Vec<usize>],
    clip: f64,
) -> candle_core::Result<ClippedBatch> {
    if spec.kind == medfl_shared::model::ModelKind::Cnn {
        return crate::cnn::clipped_person_sums(spec, io, base, params, x, y, persons, clip);
    }
    let dev = Device::Cpu;
    let layers = crate::problem::layer_vars(spec, io, params, &dev)?;
    let vars: Vec<&candle_core::Var> = layers.iter().flat_map(|(w, b)| [w, b]).collect();
    crate::problem::clipped_person_loop(persons, (x, y, io.inputs), &vars, clip, |xs, ys| {
        let mut h = Tensor::from_vec(xs, (ys.len(), io.inputs), &dev)?;
        for (i, (w, b)) in layers.iter().enumerate() {
            h = h.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
            if i + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        loss_rows(&h, &targets(ys, io.outputs, &dev)?)?.sum_all()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfl_shared::model::ModelKind;
    use proptest::prelude::*;

    fn data(rows: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-3.0..3.0)).collect();
        let y: Vec<f32> = (0..rows)
            .map(|_| if rng.random_bool(0.4) { 1.0 } else { 0.0 })
            .collect();
        (x, y)
    }

    #[test]
    fn dp_sgd_learns_separable_data_with_noise() {
        let spec = ModelSpec {
            kind: ModelKind::LogisticRegression,
            hidden: vec![],
            external: None,
            input: None,
            conv: Vec::new(),
            checkpoint: None,
            lora: None,
        };
        let d = 4;
        let (mut x, _) = data(2000, d, 5);
        let y: Vec<f32> = x
            .chunks_exact(d)
            .map(|r| if r[0] + 0.5 * r[1] > 0.0 { 1.0 } else { 0.0 })
            .collect();
        x.iter_mut().for_each(|v| *v = *v * 100.0 + 50.0); // raw scale far from unit
        let scaling = medfl_shared::model::Standardizer {
            center: vec![50.0; d],
            scale: vec![100.0; d],
        };
        let training = medfl_shared::manifest::Training {
            local_epochs: 1,
            batch_size: 1,
            learning_rate: 0.1,
            optimizer: medfl_shared::manifest::Optimizer::Adam,
            proximal_mu: None,
        };
        let dp = DpSgdConfig {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            sample_rate: 0.05,
            steps: 60,
        };
        let init = spec.init(d, 0);
        let local = LocalProblem {
            spec: &spec,
            n_features: d,
            outputs: 1,
            params: &init,
            start_on: crate::problem::Start::Initial,
            x: &x,
            y: &y,
            persons: &[],
            training: &training,
            base: None,
        };
        let out = train_dp(&local, &scaling, &dp).expect("trains");
        let acc = medfl_shared::metrics::accuracy(&spec.predict_proba(&out.params, &x, d).expect("model"), &y);
        assert!(acc > 0.9, "accuracy {acc}");
        assert!(out.effective_noise_multiplier <= 1.0 && out.effective_noise_multiplier > 0.999);
    }

    #[test]
    fn vectorized_equals_the_per_example_loop() {
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
                hidden: vec![8, 5],
                external: None,
                input: None,
                conv: Vec::new(),
                checkpoint: None,
                lora: None,
            },
        ] {
            let d = 6;
            // Binary (one logit) and four classes (softmax), the labels class indices.
            for outputs in [1, 4] {
                let io = Io { inputs: d, outputs };
                let params = spec.init(io, 3).iter().map(|p| p + 0.1).collect::<Vec<f32>>();
                let (x, mut y) = data(40, d, 9);
                if outputs > 1 {
                    y.iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = ((i * 7) % outputs) as f32);
                }
                for clip in [0.05, 1.0, 100.0] {
                    let fast = clipped_gradient_sum(&spec, io, &params, &x, &y, clip).expect("vectorized");
                    let slow = clipped_gradient_sum_looped(&spec, io, &params, &x, &y, clip).expect("looped");
                    assert_eq!(fast.clipped, slow.clipped, "{:?} clip {clip}", spec.kind);
                    for (a, b) in fast.sum.iter().zip(&slow.sum) {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "{:?} clip {clip}: {a} vs {b}",
                            spec.kind
                        );
                    }
                    assert!((fast.mean_loss - slow.mean_loss).abs() < 1e-5);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn every_example_contributes_at_most_the_clip_norm(seed in 0u64..1000, clip in 0.01f64..10.0) {
            // With one example the clipped sum is that example's clipped gradient.
            let spec = ModelSpec { kind: ModelKind::Mlp, hidden: vec![4], external: None, input: None, conv: Vec::new(), checkpoint: None, lora: None };
            let (x, y) = data(1, 3, seed);
            let params = spec.init(3, seed);
            let g = clipped_gradient_sum(&spec, 3, &params, &x, &y, clip).expect("vectorized");
            prop_assert!(medfl_shared::dp::l2_norm(&g.sum) <= clip * (1.0 + 1e-5));
        }
    }
}

/// What one DP-SGD training run at a site does: σ and q from the study's privacy plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub steps: u32,
}

/// Result of [`train_dp`].
#[derive(Debug, Clone)]
pub struct DpTrainOutcome {
    /// The new model on raw feature coordinates.
    pub params: Vec<f32>,
    /// Mean clipped-batch loss over the steps (released only as the site's policy allows).
    pub mean_loss: f64,
    pub steps: u32,
    /// The smallest noise multiplier OpenDP's map gave for any step (what was charged).
    pub effective_noise_multiplier: f64,
}

/// Record-level DP-SGD (Abadi et al. 2016, Algorithm 1) on public-scaled features:
/// each step draws a Poisson sample (rate q), sums per-example gradients clipped to
/// C, adds N(0, σ²C²) to every coordinate, divides by the expected batch q·n, and
/// takes an SGD or Adam step (post-processing). `scaling` must be public (the
/// manifest's), so the change of coordinates releases nothing about the rows.
pub fn train_dp(
    local: &LocalProblem<'_>,
    scaling: &medfl_shared::model::Standardizer,
    dp: &DpSgdConfig,
) -> anyhow::Result<DpTrainOutcome> {
    let LocalProblem {
        spec,
        n_features: d,
        params,
        start_on,
        x,
        y,
        training,
        ..
    } = *local;
    let io = local.io();
    use medfl_shared::manifest::Optimizer;
    let n = y.len();
    let mut xs = x.to_vec();
    scaling.apply(&mut xs);
    let mut theta = params.to_vec();
    if start_on == crate::problem::Start::Global {
        scaling.raw_to_standardized(spec, &mut theta);
    }
    // Where a person may have several rows, DP-SGD samples persons and clips each
    // person's summed gradient (the privacy unit is the person, not the row).
    let groups: Vec<Vec<usize>> = match local.persons {
        [] => Vec::new(),
        persons => {
            let count = persons.iter().map(|&p| p as usize + 1).max().unwrap_or(0);
            let mut groups = vec![Vec::new(); count];
            persons
                .iter()
                .enumerate()
                .for_each(|(r, &p)| groups[p as usize].push(r));
            groups.retain(|g| !g.is_empty());
            groups
        }
    };
    let units = if groups.is_empty() { n } else { groups.len() };
    let expected_batch = (dp.sample_rate * units as f64).max(1.0);
    let lr = training.learning_rate as f32;
    let (mut m, mut v) = (vec![0f32; theta.len()], vec![0f32; theta.len()]);
    let (mut loss_total, mut effective) = (0.0, f64::INFINITY);
    // FedProx's proximal gradient μ (θ − θ_t) is added after the noise: it reads no row.
    let mu = training.proximal_mu.unwrap_or(0.0) as f32;
    let anchor = theta.clone();
    for step in 1..=dp.steps {
        let sampled = medfl_shared::dp::poisson_sample(units, dp.sample_rate)?;
        let batch = if groups.is_empty() && spec.kind != medfl_shared::model::ModelKind::Cnn {
            // Dense models, one row a person: the vectorized per-example gradients.
            let bx: Vec<f32> = sampled
                .iter()
                .flat_map(|&r| xs[r * d..(r + 1) * d].iter().copied())
                .collect();
            let by: Vec<f32> = sampled.iter().map(|&r| y[r]).collect();
            clipped_gradient_sum(spec, io, &theta, &bx, &by, dp.clip_norm)?
        } else {
            // A person's rows as one micro-batch (one row each where persons are rows),
            // over the checkpoint where the study fine-tunes one.
            let chosen: Vec<Vec<usize>> = match groups.is_empty() {
                true => sampled.iter().map(|&r| vec![r]).collect(),
                false => sampled.iter().map(|&p| groups[p].clone()).collect(),
            };
            clipped_person_sums(spec, io, local.base, &theta, &xs, y, &chosen, dp.clip_norm)?
        };
        loss_total += batch.mean_loss;
        let noisy = medfl_shared::dp::add_gaussian_noise(&batch.sum, dp.clip_norm, dp.noise_multiplier)?;
        effective = effective.min(noisy.effective_noise_multiplier);
        let grad: Vec<f32> = noisy
            .values
            .iter()
            .zip(theta.iter().zip(&anchor))
            .map(|(g, (t, a))| g / expected_batch as f32 + mu * (t - a))
            .collect();
        match training.optimizer {
            Optimizer::Sgd => theta.iter_mut().zip(&grad).for_each(|(t, g)| *t -= lr * g),
            Optimizer::Adam => {
                // Kingma and Ba 2015, Algorithm 1, on the noisy gradient.
                use crate::problem::{ADAM_EPS, BETA1, BETA2};
                let (b1, b2, eps) = (BETA1 as f32, BETA2 as f32, ADAM_EPS as f32);
                let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
                for i in 0..theta.len() {
                    m[i] = b1 * m[i] + (1.0 - b1) * grad[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * grad[i] * grad[i];
                    theta[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                }
            }
        }
    }
    scaling.standardized_to_raw(spec, &mut theta);
    Ok(DpTrainOutcome {
        params: theta,
        mean_loss: loss_total / dp.steps.max(1) as f64,
        steps: dp.steps,
        effective_noise_multiplier: effective,
    })
}
