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

use candle_core::{Device, Tensor, Var};
use medfl_shared::model::ModelSpec;

/// The summed clipped per-example gradients of one batch, in the flat layout of
/// [`ModelSpec::layout`], and the batch's mean loss.
#[derive(Debug, Clone)]
pub struct ClippedBatch {
    pub sum: Vec<f32>,
    pub mean_loss: f64,
    pub rows: usize,
    /// How many examples had their gradient scaled down.
    pub clipped: usize,
}

fn layer_tensors(
    spec: &ModelSpec,
    d: usize,
    params: &[f32],
    dev: &Device,
) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
    let mut at = 0;
    spec.layer_dims(d)
        .into_iter()
        .map(|(fan_in, fan_out)| {
            let w = Tensor::from_slice(&params[at..at + fan_in * fan_out], (fan_out, fan_in), dev)?;
            at += fan_in * fan_out;
            let b = Tensor::from_slice(&params[at..at + fan_out], fan_out, dev)?;
            at += fan_out;
            Ok((w, b))
        })
        .collect()
}

fn sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

/// Binary cross-entropy per row on logits, `max(z,0) − z·y + log(1 + e^{−|z|})`.
fn bce_rows(z: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let softplus = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    (z.relu()? - (z * y)?)? + softplus
}

/// Vectorized: one forward and one backward pass over the batch, per-example norms
/// by the outer-product identity, clipping factors, and the clipped sum by matmuls.
pub fn clipped_gradient_sum(
    spec: &ModelSpec,
    d: usize,
    params: &[f32],
    x: &[f32],
    y: &[f32],
    clip: f64,
) -> candle_core::Result<ClippedBatch> {
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
    let layers = layer_tensors(spec, d, params, &dev)?;
    let yb = Tensor::from_slice(y, (rows, 1), &dev)?;
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
    let mean_loss = bce_rows(logits, &yb)?.mean_all()?.to_scalar::<f32>()? as f64;
    // Backward: δ_L = σ(z_L) − y, δ_{l−1} = (δ_l W_l) ⊙ 1[z_{l−1} > 0].
    let mut deltas = vec![sigmoid(logits)?.sub(&yb)?];
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
    d: usize,
    params: &[f32],
    x: &[f32],
    y: &[f32],
    clip: f64,
) -> candle_core::Result<ClippedBatch> {
    let dev = Device::Cpu;
    let layers: Vec<(Var, Var)> = layer_tensors(spec, d, params, &dev)?
        .into_iter()
        .map(|(w, b)| Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?)))
        .collect::<candle_core::Result<_>>()?;
    let mut sum = vec![0f32; params.len()];
    let (mut loss_total, mut clipped) = (0.0, 0);
    for (row, label) in x.chunks_exact(d).zip(y) {
        let mut h = Tensor::from_slice(row, (1, d), &dev)?;
        for (i, (w, b)) in layers.iter().enumerate() {
            h = h.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
            if i + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        let loss = bce_rows(&h, &Tensor::from_slice(&[*label], (1, 1), &dev)?)?.mean_all()?;
        loss_total += loss.to_scalar::<f32>()? as f64;
        let grads = loss.backward()?;
        let mut g = Vec::with_capacity(params.len());
        for (w, b) in &layers {
            for var in [w, b] {
                match grads.get(var.as_tensor()) {
                    Some(t) => g.extend(t.flatten_all()?.to_vec1::<f32>()?),
                    None => g.extend(std::iter::repeat_n(0.0, var.as_tensor().elem_count())),
                }
            }
        }
        let factor = medfl_shared::dp::clip_factor(medfl_shared::dp::l2_norm(&g), clip) as f32;
        if factor < 1.0 {
            clipped += 1;
        }
        sum.iter_mut().zip(&g).for_each(|(s, v)| *s += factor * v);
    }
    Ok(ClippedBatch {
        sum,
        mean_loss: loss_total / y.len().max(1) as f64,
        rows: y.len(),
        clipped,
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
    fn vectorized_equals_the_per_example_loop() {
        for spec in [
            ModelSpec {
                kind: ModelKind::LogisticRegression,
                hidden: vec![],
            },
            ModelSpec {
                kind: ModelKind::Mlp,
                hidden: vec![8, 5],
            },
        ] {
            let d = 6;
            let params = spec.init(d, 3).iter().map(|p| p + 0.1).collect::<Vec<f32>>();
            let (x, y) = data(40, d, 9);
            for clip in [0.05, 1.0, 100.0] {
                let fast = clipped_gradient_sum(&spec, d, &params, &x, &y, clip).expect("vectorized");
                let slow = clipped_gradient_sum_looped(&spec, d, &params, &x, &y, clip).expect("looped");
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn every_example_contributes_at_most_the_clip_norm(seed in 0u64..1000, clip in 0.01f64..10.0) {
            // With one example the clipped sum is that example's clipped gradient.
            let spec = ModelSpec { kind: ModelKind::Mlp, hidden: vec![4] };
            let (x, y) = data(1, 3, seed);
            let params = spec.init(3, seed);
            let g = clipped_gradient_sum(&spec, 3, &params, &x, &y, clip).expect("vectorized");
            prop_assert!(medfl_shared::dp::l2_norm(&g.sum) <= clip * (1.0 + 1e-5));
        }
    }
}
