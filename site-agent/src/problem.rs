//! What a local training problem is, for every trainer: the model's layers as candle
//! tensors, how to read the starting parameters, and the optimizer's constants. Plain
//! training (`train`) and DP-SGD (`dpsgd`) both build on it and on nothing of each other.

use candle_core::{Device, Tensor, Var};
use medfl_shared::manifest::Training;
use medfl_shared::model::{Io, ModelSpec};

/// How to read the starting parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The study's initial model, on standardized coordinates.
    Initial,
    /// A committed global model, on raw coordinates.
    Global,
}

/// One site's local training problem as the round hands it over: the model family,
/// the starting parameters and how to read them, the rows (raw, row-major, `n × n_features`)
/// with their labels (0/1, or class indices `0..outputs` for a multi-class model), and the
/// manifest's training settings.
#[derive(Debug, Clone, Copy)]
pub struct LocalProblem<'a> {
    pub spec: &'a ModelSpec,
    pub n_features: usize,
    /// The model's outputs: 1 (a binary logit) or the number of classes.
    pub outputs: usize,
    pub params: &'a [f32],
    pub start_on: Start,
    pub x: &'a [f32],
    pub y: &'a [f32],
    /// Each row's person, where a person may have several rows (an image dataset's
    /// patients): DP-SGD samples and clips per person. Empty: every row is a person.
    pub persons: &'a [u32],
    pub training: &'a Training,
    /// A fine-tuned model's checkpoint (network layout): `params` are offsets and
    /// adapters over it ([`medfl_shared::lora`]).
    pub base: Option<&'a [f32]>,
}

/// What local training produced (plain training, any model family).
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The new model, on raw feature coordinates.
    pub params: Vec<f32>,
    /// Mean training loss over the last epoch.
    pub loss: f64,
    pub examples: usize,
}

/// The summed clipped per-example gradients of one batch, in the flat layout of
/// [`ModelSpec::layout`] (DP-SGD, any model family), and the batch's mean loss.
#[derive(Debug, Clone)]
pub struct ClippedBatch {
    pub sum: Vec<f32>,
    pub mean_loss: f64,
    pub rows: usize,
    /// How many examples had their gradient scaled down.
    pub clipped: usize,
}

/// Adds one example's gradient to `sum`, clipped to L2 norm `clip` (Abadi et al. 2016,
/// Algorithm 1): each variable's gradient from `grads` in order, zeros where it has
/// none, gathered in `scratch`. Returns whether it was scaled down.
pub(crate) fn add_clipped<'a>(
    grads: &candle_core::backprop::GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    clip: f64,
    scratch: &mut Vec<f32>,
    sum: &mut [f32],
) -> candle_core::Result<bool> {
    scratch.clear();
    for var in vars {
        match grads.get(var.as_tensor()) {
            Some(t) => scratch.extend(t.flatten_all()?.to_vec1::<f32>()?),
            None => scratch.extend(std::iter::repeat_n(0.0, var.as_tensor().elem_count())),
        }
    }
    let factor = medfl_shared::dp::clip_factor(medfl_shared::dp::l2_norm(scratch), clip) as f32;
    sum.iter_mut().zip(scratch.iter()).for_each(|(s, v)| *s += factor * v);
    Ok(factor < 1.0)
}

/// Per-person clipping's loop, for every model family: each person's rows (their
/// inputs, `width` values a row, and labels) go through `loss`, which returns their
/// summed loss as one scalar; its gradient over `vars` (in the flat layout's order) is
/// clipped to `clip` as one contribution and added to the sum. The sensitivity to
/// adding or removing one person is `clip`, whatever their number of rows.
pub(crate) fn clipped_person_loop(
    persons: &[Vec<usize>],
    (x, y, width): (&[f32], &[f32], usize),
    vars: &[&Var],
    clip: f64,
    mut loss: impl FnMut(Vec<f32>, &[f32]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<ClippedBatch> {
    let len = vars.iter().map(|v| v.as_tensor().elem_count()).sum();
    let mut sum = vec![0f32; len];
    let (mut loss_total, mut clipped, mut rows) = (0.0, 0, 0);
    let mut g = Vec::with_capacity(len);
    for person in persons {
        let xs: Vec<f32> = person
            .iter()
            .flat_map(|&r| x[r * width..(r + 1) * width].iter().copied())
            .collect();
        let ys: Vec<f32> = person.iter().map(|&r| y[r]).collect();
        let loss = loss(xs, &ys)?;
        loss_total += f64::from(loss.to_scalar::<f32>()?);
        rows += person.len();
        if add_clipped(&loss.backward()?, vars.iter().copied(), clip, &mut g, &mut sum)? {
            clipped += 1;
        }
    }
    Ok(ClippedBatch {
        sum,
        mean_loss: loss_total / rows.max(1) as f64,
        rows,
        clipped,
    })
}

/// Adam's constants (Kingma and Ba 2015, Algorithm 1).
pub(crate) const BETA1: f64 = 0.9;
pub(crate) const BETA2: f64 = 0.999;
pub(crate) const ADAM_EPS: f64 = 1e-8;

/// Splits flat parameters into each layer's (weight [out, in], bias [out]) tensors.
pub(crate) fn layer_tensors(
    spec: &ModelSpec,
    io: Io,
    params: &[f32],
    dev: &Device,
) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
    let mut at = 0;
    spec.layer_dims(io)
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

pub(crate) fn layer_vars(
    spec: &ModelSpec,
    io: Io,
    params: &[f32],
    dev: &Device,
) -> candle_core::Result<Vec<(Var, Var)>> {
    layer_tensors(spec, io, params, dev)?
        .into_iter()
        .map(|(w, b)| Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?)))
        .collect()
}

impl LocalProblem<'_> {
    /// The model's input and output widths.
    pub fn io(&self) -> Io {
        Io {
            inputs: self.n_features,
            outputs: self.outputs,
        }
    }
}

/// The training targets: labels as a column `(rows, 1)` for a binary model, one-hot
/// rows `(rows, k)` for `k` classes (labels are class indices).
pub(crate) fn targets(y: &[f32], outputs: usize, dev: &Device) -> candle_core::Result<Tensor> {
    if outputs <= 1 {
        return Tensor::from_slice(y, (y.len(), 1), dev);
    }
    let mut one_hot = vec![0f32; y.len() * outputs];
    for (r, label) in y.iter().enumerate() {
        one_hot[r * outputs + (*label as usize).min(outputs - 1)] = 1.0;
    }
    Tensor::from_vec(one_hot, (y.len(), outputs), dev)
}

/// Each row's loss on logits `z` against targets `t` (see [`targets`]), shape `(rows, 1)`:
/// binary cross-entropy `max(z,0) − z·y + log(1 + e^{−|z|})` (overflow-free) for one
/// output, softmax cross-entropy `logsumexp(z) − z·t` for several.
pub(crate) fn loss_rows(z: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    if z.dims()[1] <= 1 {
        let softplus = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
        return (z.relu()? - (z * t)?)? + softplus;
    }
    let max = z.max_keepdim(1)?;
    let logsumexp = (z.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    logsumexp - (z * t)?.sum_keepdim(1)?
}

/// The gradient of [`loss_rows`] with respect to the logits: `σ(z) − y` for one output,
/// `softmax(z) − t` for several (the same form, which per-example clipping relies on).
pub(crate) fn output_delta(z: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    if z.dims()[1] <= 1 {
        return (z.neg()?.exp()? + 1.0)?.recip()?.sub(t);
    }
    let e = z.broadcast_sub(&z.max_keepdim(1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)?.sub(t)
}
