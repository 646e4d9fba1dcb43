//! Conv-net training with candle-core on the CPU ([`medfl_shared::cnn`] gives the
//! family and its layout): plain minibatch training, and the clipped per-example
//! gradient sums DP-SGD needs.
//!
//! candle's autograd sums a batch's gradients, and a conv layer's per-example weight
//! gradient has no outer-product shortcut like a dense layer's. DP-SGD therefore runs
//! micro-batches of exactly one example (Abadi et al., CCS 2016, Algorithm 1: the
//! gradient of each example is clipped on its own; a micro-batch of several examples
//! would clip their sum and change the sensitivity). Ghost clipping (Li et al., ICLR
//! 2022; Bu et al., AAAI 2023) would avoid the per-example passes and is not built.
//!
//! They run on the device agent.toml selects ([`crate::device`]): the CPU, or a CUDA GPU
//! in a build with the `cuda` feature.
//!
//! The image inputs are already on the study's public normalisation (`[data.image]`),
//! so no site-level standardization happens here.

use candle_core::{DType, Device, Tensor, Var};
use medfl_shared::lora::Role;
use medfl_shared::manifest::Optimizer;
use medfl_shared::model::{Cnn, Io, ModelSpec};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use crate::problem::{ADAM_EPS, BETA1, BETA2, ClippedBatch, LocalProblem, TrainOutcome, loss_rows, targets};

/// The trained variables and how they make the network's tensors: for a model
/// without a checkpoint the variables are the network's tensors; for a fine-tuned one
/// ([`medfl_shared::lora`]) they are offsets and LoRA `B`s over the checkpoint's
/// frozen tensors, and each forward pass builds `W₀ + Δ` or `W₀ + (α/r)·B·A`.
struct Net {
    vars: Vec<Var>,
    frozen: Option<Frozen>,
}

/// A fine-tuned model's fixed part: the checkpoint's tensors (network layout) and, per
/// variable, the tensor it adapts with its frozen `A` (scaled) for a LoRA `B`.
struct Frozen {
    base: Vec<Tensor>,
    pieces: Vec<(usize, Option<Tensor>)>,
}

impl Net {
    fn new(spec: &ModelSpec, io: Io, base: Option<&[f32]>, params: &[f32], dev: &Device) -> candle_core::Result<Self> {
        let tensors = |layout: &[medfl_shared::model::TensorSpec], values: &[f32]| {
            let mut at = 0;
            layout
                .iter()
                .map(|t| {
                    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                    let len = t.len() as usize;
                    let v = Tensor::from_slice(&values[at..at + len], shape, dev);
                    at += len;
                    v
                })
                .collect::<candle_core::Result<Vec<Tensor>>>()
        };
        let layout = spec.layout(io);
        if params.len() != layout.iter().map(|t| t.len() as usize).sum::<usize>() {
            return Err(candle_core::Error::Msg(format!(
                "the model has {} values, its layout {}",
                params.len(),
                layout.iter().map(|t| t.len()).sum::<u64>()
            )));
        }
        let vars = tensors(&layout, params)?
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<Var>>>()?;
        let Some(pieces) = spec.pieces(io) else {
            return Ok(Net { vars, frozen: None });
        };
        let base_layout = spec.base_layout(io);
        let base = base.ok_or_else(|| {
            candle_core::Error::Msg("a fine-tuned model trains over its checkpoint, and none was loaded".into())
        })?;
        if base.len() != base_layout.iter().map(|t| t.len() as usize).sum::<usize>() {
            return Err(candle_core::Error::Msg(
                "the checkpoint does not fit the model's layout".into(),
            ));
        }
        let seed = spec.lora.as_ref().map_or(0, |l| l.seed);
        let pieces = pieces
            .iter()
            .map(|p| match p.role {
                Role::Offset => Ok((p.base, None)),
                Role::LoraB { rank, fan_in, scale } => {
                    let a = medfl_shared::lora::lora_a(seed, &base_layout[p.base].name, rank, fan_in);
                    Ok((
                        p.base,
                        Some((Tensor::from_vec(a, (rank, fan_in), dev)? * f64::from(scale))?),
                    ))
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Net {
            vars,
            frozen: Some(Frozen {
                base: tensors(&base_layout, base)?,
                pieces,
            }),
        })
    }

    /// The network's tensors in layout order (differentiable in the variables).
    fn tensors(&self) -> candle_core::Result<Vec<Tensor>> {
        let Some(frozen) = &self.frozen else {
            return Ok(self.vars.iter().map(|v| v.as_tensor().clone()).collect());
        };
        let mut out = frozen.base.clone();
        for (var, (at, a)) in self.vars.iter().zip(&frozen.pieces) {
            let w0 = &frozen.base[*at];
            out[*at] = match a {
                None => (w0 + var.as_tensor())?,
                Some(a) => (w0 + var.as_tensor().matmul(a)?.reshape(w0.shape())?)?,
            };
        }
        Ok(out)
    }

    /// Sets the network's tensor `at` to `value` (batch norm's running statistics): its
    /// variable, or for a fine-tuned model its offset from the checkpoint.
    fn set_network_tensor(&self, at: usize, value: &Tensor) -> candle_core::Result<()> {
        let Some(frozen) = &self.frozen else {
            return self.vars[at].set(value);
        };
        match frozen.pieces.iter().position(|(b, a)| *b == at && a.is_none()) {
            Some(i) => self.vars[i].set(&(value - &frozen.base[at])?),
            // Not trained (refused with LoRA by the manifest): stays at the checkpoint's.
            None => Ok(()),
        }
    }
}

/// A batch norm's statistics from one training batch, for its running averages: the
/// running mean's and variance's variable indices, the batch mean and the unbiased
/// batch variance (per channel).
struct BatchStats {
    mean_var: usize,
    var_var: usize,
    mean: Tensor,
    var: Tensor,
}

/// The logits `(n, outputs)` of images `x` `(n, c, h, w)`; the same computation as
/// [`Cnn::logits`], differentiable, except that a batch norm normalises with the batch's
/// own statistics (training mode) and reports them in `stats`.
fn forward(
    cnn: &Cnn<'_>,
    tensors: &[Tensor],
    x: &Tensor,
    mut stats: Option<&mut Vec<BatchStats>>,
) -> candle_core::Result<Tensor> {
    let mut next = tensors.iter().enumerate();
    let mut take = || {
        next.next()
            .ok_or_else(|| candle_core::Error::Msg("the parameters end before the model does".into()))
    };
    let mut h = x.clone();
    for block in cnn.blocks {
        let ((_, w), (_, b)) = (take()?, take()?);
        let o = block.channels;
        h = conv_same(&h, w, block.kernel)?.broadcast_add(&b.reshape((1, o, 1, 1))?)?;
        if let Some(groups) = block.norm_groups() {
            let ((_, gamma), (_, beta)) = (take()?, take()?);
            let (n, _, hh, ww) = h.dims4()?;
            // Group norm (Wu and He 2018, eq. 1–3): each example's groups over their
            // channels and pixels, biased variance, then a per-channel scale and shift.
            let g = h.reshape((n, groups, (o / groups) * hh * ww))?;
            let mean = g.mean_keepdim(2)?;
            let centred = g.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(2)?;
            let normed = centred.broadcast_div(&(var + f64::from(medfl_shared::cnn::NORM_EPS))?.sqrt()?)?;
            h = normed
                .reshape((n, o, hh, ww))?
                .broadcast_mul(&gamma.reshape((1, o, 1, 1))?)?
                .broadcast_add(&beta.reshape((1, o, 1, 1))?)?;
        } else if block.norm == medfl_shared::model::Norm::Batch {
            let ((_, gamma), (_, beta), (mean_var, _), (var_var, _)) = (take()?, take()?, take()?, take()?);
            let (n, _, hh, ww) = h.dims4()?;
            // Batch norm in training mode (Ioffe and Szegedy 2015, Algorithm 1): each
            // channel over the batch's examples and pixels, biased variance.
            let per_channel = h.transpose(0, 1)?.reshape((o, n * hh * ww))?;
            let mean = per_channel.mean_keepdim(1)?;
            let centred = per_channel.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(1)?;
            let normed = centred.broadcast_div(&(&var + f64::from(medfl_shared::cnn::NORM_EPS))?.sqrt()?)?;
            h = normed
                .reshape((o, n, hh, ww))?
                .transpose(0, 1)?
                .broadcast_mul(&gamma.reshape((1, o, 1, 1))?)?
                .broadcast_add(&beta.reshape((1, o, 1, 1))?)?;
            if let Some(stats) = stats.as_deref_mut() {
                let m = (n * hh * ww) as f64;
                stats.push(BatchStats {
                    mean_var,
                    var_var,
                    mean: mean.flatten_all()?.detach(),
                    var: (var.flatten_all()? * (m / (m - 1.0).max(1.0)))?.detach(),
                });
            }
        }
        h = h.relu()?;
        if block.pool > 1 {
            h = h.max_pool2d(block.pool)?;
        }
    }
    h = h.flatten_from(1)?;
    let dims = cnn.dense_dims();
    for j in 0..dims.len() {
        let ((_, w), (_, b)) = (take()?, take()?);
        h = h.matmul(&w.t()?)?.broadcast_add(b)?;
        if j + 1 < dims.len() {
            h = h.relu()?;
        }
    }
    Ok(h)
}

/// A stride-1 "same" convolution as im2col and one matrix product: the zero-padded
/// input's `k × k` shifted views, stacked channel-major (the weight's `[in, k, k]`
/// order), times the weight as `[out, in·k·k]`. candle-core 0.9.2's own CPU `conv2d`
/// (its tiled im2col) returns wrong values when the input's channels equal its side
/// (e.g. 4 channels of 4×4), which a conv net's later blocks meet; this path uses only
/// padding, views and a matmul, all differentiable.
fn conv_same(x: &Tensor, weight: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let o = weight.dims()[0];
    let p = k / 2;
    let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    let mut views = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            views.push(padded.narrow(2, ky, h)?.narrow(3, kx, w)?);
        }
    }
    let columns = Tensor::stack(&views, 2)?.reshape((n, c * k * k, h * w))?;
    weight
        .reshape((o, c * k * k))?
        .broadcast_matmul(&columns)?
        .reshape((n, o, h, w))
}

fn images(cnn: &Cnn<'_>, x: &[f32], rows: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let [c, h, w] = cnn.input;
    Tensor::from_slice(x, (rows, c, h, w), dev)
}

fn flat(vars: &[Var]) -> candle_core::Result<Vec<f32>> {
    let mut out = Vec::new();
    for v in vars {
        out.extend(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Batch norm's running-average momentum (PyTorch's default).
const BN_MOMENTUM: f64 = 0.1;

/// Minibatch training from the problem's starting model (SGD or Adam as the manifest
/// says, FedProx's proximal term when set); the inputs are on the public scale.
pub fn train(local: &LocalProblem<'_>, seed: u64) -> candle_core::Result<TrainOutcome> {
    let dev = crate::device::current()?;
    let io = local.io();
    let cnn = local.spec.cnn(io);
    let cfg = local.training;
    let n = local.y.len();
    let net = Net::new(local.spec, io, local.base, local.params, &dev)?;
    let vars = &net.vars;
    let x_all = images(&cnn, local.x, n, &dev)?;
    let y_all = targets(local.y, io.outputs, &dev)?;
    let mu = cfg.proximal_mu.unwrap_or(0.0);
    let anchors: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    let mut moments: Vec<(Tensor, Tensor)> = vars
        .iter()
        .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
        .collect::<candle_core::Result<_>>()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let batch = (cfg.batch_size as usize).clamp(1, n.max(1));
    let (mut step, mut last_loss) = (0i32, 0.0);
    for _ in 0..cfg.local_epochs {
        order.shuffle(&mut rng);
        let (mut total, mut batches) = (0.0, 0);
        for idx in order.chunks(batch) {
            let idx = Tensor::from_slice(idx, idx.len(), &dev)?;
            let xb = x_all.index_select(&idx, 0)?;
            let yb = y_all.index_select(&idx, 0)?;
            let mut stats = Vec::new();
            let tensors = net.tensors()?;
            let loss = loss_rows(&forward(&cnn, &tensors, &xb, Some(&mut stats))?, &yb)?.mean_all()?;
            total += f64::from(loss.to_scalar::<f32>()?);
            // Batch norm's running averages, PyTorch's momentum 0.1 (no gradient: they
            // are read only at inference).
            for s in &stats {
                let (mean, var) = (tensors[s.mean_var].detach(), tensors[s.var_var].detach());
                net.set_network_tensor(s.mean_var, &((mean * (1.0 - BN_MOMENTUM))? + (&s.mean * BN_MOMENTUM)?)?)?;
                net.set_network_tensor(s.var_var, &((var * (1.0 - BN_MOMENTUM))? + (&s.var * BN_MOMENTUM)?)?)?;
            }
            batches += 1;
            let grads = loss.backward()?;
            step += 1;
            for (i, var) in vars.iter().enumerate() {
                let Some(g) = grads.get(var.as_tensor()) else { continue };
                let g = if mu > 0.0 {
                    (g + ((var.as_tensor() - &anchors[i])? * mu)?)?
                } else {
                    g.clone()
                };
                match cfg.optimizer {
                    Optimizer::Sgd => var.set(&(var.as_tensor() - g.affine(cfg.learning_rate, 0.0)?)?)?,
                    Optimizer::Adam => {
                        // Kingma and Ba 2015, Algorithm 1.
                        let (m, v) = &mut moments[i];
                        *m = ((&*m * BETA1)? + (&g * (1.0 - BETA1))?)?;
                        *v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                        let m_hat = (&*m / (1.0 - BETA1.powi(step)))?;
                        let v_hat = (&*v / (1.0 - BETA2.powi(step)))?;
                        let delta = (m_hat / (v_hat.sqrt()? + ADAM_EPS)?)?;
                        var.set(&(var.as_tensor() - (delta * cfg.learning_rate)?)?)?;
                    }
                }
            }
        }
        last_loss = total / f64::from(batches.max(1));
    }
    Ok(TrainOutcome {
        params: flat(vars)?,
        loss: last_loss,
        examples: n,
    })
}

/// The batch's per-example gradients, each clipped to L2 norm `clip`, summed: one
/// forward and backward pass per example (a micro-batch of one).
pub fn clipped_gradient_sum(
    spec: &ModelSpec,
    io: Io,
    base: Option<&[f32]>,
    params: &[f32],
    x: &[f32],
    y: &[f32],
    clip: f64,
) -> candle_core::Result<ClippedBatch> {
    let each: Vec<Vec<usize>> = (0..y.len()).map(|r| vec![r]).collect();
    clipped_person_sums(spec, io, base, params, x, y, &each, clip)
}

/// Per-person DP-SGD: each person's rows (a patient's images) as one micro-batch, whose
/// summed loss's gradient is the sum of their examples' gradients, clipped to `clip` as
/// one contribution, then summed over the persons. The sensitivity to adding or removing
/// one person is `clip`, whatever their number of images. For a fine-tuned model the
/// gradients are those of what travels (offsets, LoRA's `B`s) over `base`, the checkpoint.
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
    if spec.conv.iter().any(|b| b.norm == medfl_shared::model::Norm::Batch) {
        // Manifests refuse it; this is the trainer's own guard.
        return Err(candle_core::Error::Msg(
            "batch norm has no per-example gradients: DP-SGD cannot train it".into(),
        ));
    }
    let dev = crate::device::current()?;
    let cnn = spec.cnn(io);
    let net = Net::new(spec, io, base, params, &dev)?;
    // The network's tensors once for the batch (the variables do not move within it);
    // each micro-batch's backward pass goes through them to the variables.
    let tensors = net.tensors()?;
    let vars: Vec<&candle_core::Var> = net.vars.iter().collect();
    crate::problem::clipped_person_loop(persons, (x, y, io.inputs), &vars, clip, |xs, ys| {
        let xb = images(&cnn, &xs, ys.len(), &dev)?;
        loss_rows(&forward(&cnn, &tensors, &xb, None)?, &targets(ys, io.outputs, &dev)?)?.sum_all()
    })
}

/// The logits (row-major, `io.outputs` per image) of a fine-tuned model as it trains:
/// the checkpoint `base` with the study's offsets and adapters applied in the forward
/// pass, not merged. What a merged export must reproduce.
pub fn logits_with_adapters(
    spec: &ModelSpec,
    io: Io,
    base: &[f32],
    params: &[f32],
    x: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let dev = Device::Cpu;
    let net = Net::new(spec, io, Some(base), params, &dev)?;
    let cnn = spec.cnn(io);
    let rows = x.len() / io.inputs.max(1);
    forward(&cnn, &net.tensors()?, &images(&cnn, x, rows, &dev)?, None)?
        .flatten_all()?
        .to_vec1()
}

#[cfg(test)]
mod tests {
    use medfl_shared::manifest::Training;
    use medfl_shared::model::{ConvBlock, ModelKind, Norm};

    use super::*;
    use crate::problem::Start;

    fn spec(norm: Norm) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Cnn,
            hidden: vec![16],
            external: None,
            input: Some([1, 8, 8]),
            conv: vec![
                ConvBlock {
                    channels: 4,
                    kernel: 3,
                    norm,
                    groups: 2,
                    pool: 2,
                },
                ConvBlock {
                    channels: 8,
                    kernel: 3,
                    norm: Norm::None,
                    groups: 1,
                    pool: 2,
                },
            ],
            checkpoint: None,
            lora: None,
        }
    }

    /// Two classes of 8×8 images: a bright left half or a bright right half, noisy.
    fn halves(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..n {
            let class = i % 2;
            for _ in 0..8 {
                for col in 0..8 {
                    let bright = (col < 4) == (class == 0);
                    x.push(if bright { 1.0 } else { 0.0 } + rng.random_range(-0.3..0.3));
                }
            }
            y.push(class as f32);
        }
        (x, y)
    }

    /// The second block reads 4 channels of 4×4: the shape candle's own conv2d gets wrong.
    #[test]
    fn candle_forward_equals_the_plain_inference_pass() {
        for norm in [Norm::None, Norm::Group, Norm::Layer] {
            let spec = spec(norm);
            let io = Io { inputs: 64, outputs: 3 };
            let params = spec.init(io, 7);
            let (x, _) = halves(5, 1);
            let plain = spec.logits(&params, &x, io).expect("plain");
            let dev = Device::Cpu;
            let net = Net::new(&spec, io, None, &params, &dev).expect("vars");
            let cnn = spec.cnn(io);
            let z = forward(
                &cnn,
                &net.tensors().expect("tensors"),
                &images(&cnn, &x, 5, &dev).expect("x"),
                None,
            )
            .expect("forward");
            let z: Vec<f32> = z.flatten_all().expect("flat").to_vec1().expect("values");
            for (a, b) in z.iter().zip(&plain) {
                assert!((a - b).abs() < 1e-4, "{norm:?}: {a} vs {b}");
            }
        }
    }

    /// LoRA over a checkpoint: only the adapters and the head train, the task is learnt,
    /// and the merged network's plain inference equals the candle pass with the adapters
    /// applied (to 1e-5).
    #[test]
    fn lora_fine_tunes_a_checkpoint_and_merges_to_the_same_predictions() {
        let base_spec = spec(Norm::Group);
        let io = Io { inputs: 64, outputs: 1 };
        let (x, y) = halves(64, 2);
        let training = Training {
            local_epochs: 8,
            batch_size: 8,
            learning_rate: 0.01,
            ..Training::default()
        };
        let problem = |spec: &'_ ModelSpec, params: &'_ [f32], y: &'_ [f32], base: Option<&'_ [f32]>| {
            train(
                &LocalProblem {
                    spec,
                    n_features: 64,
                    outputs: 1,
                    params,
                    start_on: Start::Initial,
                    x: &x,
                    y,
                    persons: &[],
                    training: &training,
                    base,
                },
                5,
            )
            .expect("trained")
        };
        let pretrained = problem(&base_spec, &base_spec.init(io, 3), &y, None).params;
        // The new task: the classes swapped.
        let flipped: Vec<f32> = y.iter().map(|v| 1.0 - v).collect();
        let tuned_spec = ModelSpec {
            checkpoint: Some(medfl_shared::model::Checkpoint {
                file: "pretrained.safetensors".into(),
                sha256: "0".repeat(64),
            }),
            lora: Some(medfl_shared::model::Lora {
                rank: 2,
                alpha: Some(4),
                targets: vec!["conv1".into(), "fc0".into()],
                head: true,
                seed: 11,
            }),
            ..base_spec.clone()
        };
        let names: Vec<String> = tuned_spec.layout(io).into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["conv1.lora_b", "fc0.lora_b", "fc1.weight", "fc1.bias"]);
        let start = tuned_spec.init(io, 0);
        assert!(start.iter().all(|v| *v == 0.0));
        let out = problem(&tuned_spec, &start, &flipped, Some(&pretrained));
        let merged = tuned_spec.merged(io, &pretrained, &out.params).expect("merged");
        let acc = medfl_shared::metrics::accuracy(&base_spec.predict_proba(&merged, &x, io).expect("scored"), &flipped);
        assert!(acc > 0.9, "accuracy {acc} after LoRA fine-tuning");
        // conv0 was not a target: the merged model keeps the checkpoint's values there.
        assert_eq!(merged[..40], pretrained[..40]);
        let dev = Device::Cpu;
        let net = Net::new(&tuned_spec, io, Some(&pretrained), &out.params, &dev).expect("net");
        let cnn = base_spec.cnn(io);
        let z = forward(
            &cnn,
            &net.tensors().expect("tensors"),
            &images(&cnn, &x, 64, &dev).expect("x"),
            None,
        )
        .expect("forward");
        let z: Vec<f32> = z.flatten_all().expect("flat").to_vec1().expect("values");
        let plain = base_spec.logits(&merged, &x, io).expect("plain");
        for (a, b) in z.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // DP-SGD clips the adapters' per-example gradients: the travelling layout's.
        let batch = clipped_gradient_sum(
            &tuned_spec,
            io,
            Some(&pretrained),
            &out.params,
            &x[..64 * 4],
            &flipped[..4],
            1e-3,
        )
        .expect("clipped");
        assert_eq!((batch.sum.len(), batch.clipped), (out.params.len(), 4));
        assert!(medfl_shared::dp::l2_norm(&batch.sum) <= 4.0 * 1e-3 + 1e-6);
        // Without its checkpoint nothing trains.
        let err = clipped_gradient_sum(&tuned_spec, io, None, &out.params, &x[..64], &flipped[..1], 1.0)
            .expect_err("no base");
        assert!(err.to_string().contains("none was loaded"), "{err}");
    }

    #[test]
    fn batch_norm_trains_and_inference_reads_its_running_statistics() {
        let spec = spec(Norm::Batch);
        let io = Io { inputs: 64, outputs: 1 };
        let (x, y) = halves(64, 4);
        let training = Training {
            local_epochs: 5,
            batch_size: 8,
            learning_rate: 0.01,
            ..Training::default()
        };
        let params = spec.init(io, 3);
        let local = LocalProblem {
            spec: &spec,
            n_features: 64,
            outputs: 1,
            params: &params,
            start_on: Start::Initial,
            x: &x,
            y: &y,
            persons: &[],
            training: &training,
            base: None,
        };
        let out = train(&local, 5).expect("trained");
        // The running statistics moved from their start (mean 0, variance 1).
        let layout = spec.layout(io);
        let mut at = 0;
        for t in &layout {
            let values = &out.params[at..at + t.len() as usize];
            if t.name == "norm0.running_mean" {
                assert!(values.iter().any(|v| v.abs() > 1e-3), "{values:?}");
            }
            at += t.len() as usize;
        }
        let probs = spec.predict_proba(&out.params, &x, io).expect("scored");
        let acc = medfl_shared::metrics::accuracy(&probs, &y);
        assert!(acc > 0.95, "accuracy {acc} with the running statistics");
        let err = clipped_gradient_sum(&spec, io, None, &params, &x[..64], &y[..1], 1.0).expect_err("no DP-SGD");
        assert!(err.to_string().contains("no per-example gradients"));
    }

    #[test]
    fn a_cnn_learns_and_each_example_is_clipped() {
        let spec = spec(Norm::Group);
        let io = Io { inputs: 64, outputs: 1 };
        let (x, y) = halves(64, 2);
        let training = Training {
            local_epochs: 5,
            batch_size: 8,
            learning_rate: 0.01,
            ..Training::default()
        };
        let params = spec.init(io, 3);
        let local = LocalProblem {
            spec: &spec,
            n_features: 64,
            outputs: 1,
            params: &params,
            start_on: Start::Initial,
            x: &x,
            y: &y,
            persons: &[],
            training: &training,
            base: None,
        };
        let out = train(&local, 5).expect("trained");
        let probs = spec.predict_proba(&out.params, &x, io).expect("scored");
        let acc = medfl_shared::metrics::accuracy(&probs, &y);
        assert!(acc > 0.95, "accuracy {acc}");
        // Per-example clipping: with a tiny clip norm every example is clipped and the
        // sum's norm is at most rows × C.
        let clip = 1e-3;
        let batch = clipped_gradient_sum(&spec, io, None, &params, &x[..64 * 10], &y[..10], clip).expect("clipped");
        assert_eq!((batch.rows, batch.clipped), (10, 10));
        let norm = medfl_shared::dp::l2_norm(&batch.sum);
        assert!(norm <= 10.0 * clip + 1e-6, "{norm}");
        // One example's clipped gradient is its own: the sum of two single-example
        // batches equals the two-example batch.
        let a = clipped_gradient_sum(&spec, io, None, &params, &x[..64], &y[..1], 0.5).expect("a");
        let b = clipped_gradient_sum(&spec, io, None, &params, &x[64..128], &y[1..2], 0.5).expect("b");
        let ab = clipped_gradient_sum(&spec, io, None, &params, &x[..128], &y[..2], 0.5).expect("ab");
        for ((p, q), r) in a.sum.iter().zip(&b.sum).zip(&ab.sum) {
            assert!((p + q - r).abs() < 1e-5);
        }
        // Per person: a patient's three images are one contribution, clipped as one.
        let persons = vec![vec![0, 1, 2], vec![3]];
        let by_person =
            clipped_person_sums(&spec, io, None, &params, &x[..64 * 4], &y[..4], &persons, clip).expect("persons");
        assert_eq!((by_person.rows, by_person.clipped), (4, 2));
        assert!(medfl_shared::dp::l2_norm(&by_person.sum) <= 2.0 * clip + 1e-6);
        // Unclipped, a person's contribution is the sum of their examples' gradients.
        let loose =
            clipped_person_sums(&spec, io, None, &params, &x[..64 * 3], &y[..3], &[vec![0, 1, 2]], 1e9).expect("one");
        let each = clipped_gradient_sum(&spec, io, None, &params, &x[..64 * 3], &y[..3], 1e9).expect("each");
        for (p, q) in loose.sum.iter().zip(&each.sum) {
            assert!((p - q).abs() < 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}
