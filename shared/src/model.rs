//! Model specifications, their flat parameter layout, initialization, inference and
//! the change of input coordinates that lets each site standardize its own features.
//!
//! A model's parameters travel and are stored as one flat `f32` vector: the tensors of
//! [`ModelSpec::layout`] in order, each row-major. Every layer is `weight [out, in]`
//! then `bias [out]`; hidden layers use ReLU and the single output is a logit.

use rand::{Rng, SeedableRng, rngs::StdRng};

pub use crate::cnn::{Cnn, ConvBlock, Norm};
pub use crate::layout::TensorSpec;
pub use crate::lora::{Checkpoint, Lora, Piece};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest model the coordinator accepts: 2^31 values (8 GiB of f32).
pub const MAX_PARAMS: u64 = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    LogisticRegression,
    Mlp,
    /// A conv net over an image study's input ([`crate::cnn`]): `input`, `conv` blocks,
    /// then `hidden` dense layers.
    Cnn,
    /// Trained by each site's own trainer process (`[trainers.NAME]` in agent.toml):
    /// medfl knows only its layout, [`ModelSpec::external`].
    External,
}

/// A model's input width and output width: one logit for a binary label, one per class
/// for `K > 2` classes (softmax). A bare `usize` is a binary model on that many inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    pub inputs: usize,
    pub outputs: usize,
}

impl From<usize> for Io {
    fn from(inputs: usize) -> Self {
        Io { inputs, outputs: 1 }
    }
}

/// The model part of a study manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub kind: ModelKind,
    /// Hidden layer widths of an MLP; empty for logistic regression.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// For `kind = "external"`: the trainer's name and the tensors it trains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalModel>,
    /// For `kind = "cnn"`: the image input `[channels, height, width]` (the study's
    /// `[data.image]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<[usize; 3]>,
    /// For `kind = "cnn"`: the convolution blocks, `[[model.conv]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conv: Vec<ConvBlock>,
    /// `[model.init]`: fine-tune this pretrained checkpoint ([`crate::lora`]): what
    /// travels is then an offset from it.
    #[serde(rename = "init", default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// `[model.lora]`: train LoRA adapters on the checkpoint (FFA-LoRA, [`crate::lora`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<Lora>,
}

/// A model trained by the sites' own trainers (`[model.external]`): a trainer name each
/// site maps to one of its local trainers, and the layout (f32 tensors, row-major, in
/// order) that travels and is aggregated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalModel {
    pub trainer: String,
    pub tensors: Vec<TensorSpec>,
    /// How the study's initial model is drawn (from the manifest's seed).
    #[serde(default)]
    pub init: ExternalInit,
}

/// The initial values of an external model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExternalInit {
    /// All zeros (right for linear models).
    #[default]
    Zeros,
    /// Tensors of two or more dimensions uniform in ±1/√fan_in (fan_in = the product of
    /// all but the first dimension, PyTorch's `Linear` default), one-dimensional ones
    /// zero (for networks, whose units must start apart).
    Uniform,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("logistic regression takes no hidden layers (got {0:?})")]
    HiddenOnLinear(Vec<usize>),
    #[error("an MLP needs at least one hidden layer")]
    NoHidden,
    #[error("hidden layer width {0} is outside 1..=65536")]
    BadWidth(usize),
    #[error("model needs at least one input feature")]
    NoFeatures,
    #[error("model has {0} parameters, more than the limit of {MAX_PARAMS}")]
    TooLarge(u64),
    #[error("parameter vector has {got} values, the model needs {want}")]
    WrongLength { got: usize, want: usize },
    #[error("{0}")]
    External(String),
    #[error("an external model is scored by its own trainer, not by medfl")]
    NoInference,
    #[error("{0}")]
    Cnn(String),
    #[error("{0}")]
    FineTune(String),
}

impl ModelSpec {
    pub fn validate(&self, n_features: usize) -> Result<(), ModelError> {
        if self.kind == ModelKind::External || self.external.is_some() {
            return self.validate_external();
        }
        if n_features == 0 {
            return Err(ModelError::NoFeatures);
        }
        if (self.kind == ModelKind::Cnn) != (self.input.is_some() || !self.conv.is_empty()) {
            return Err(ModelError::Cnn(
                "model.input and [[model.conv]] belong to kind = \"cnn\", which needs both".into(),
            ));
        }
        if let Some(input) = self.input {
            let cnn = self.cnn(Io {
                inputs: n_features,
                outputs: 1,
            });
            cnn.check().map_err(ModelError::Cnn)?;
            if input.iter().product::<usize>() != n_features {
                return Err(ModelError::Cnn(format!(
                    "model.input = {input:?} is {} values, the study's data gives {n_features} (set model.input to data.image's [channels, height, width])",
                    input.iter().product::<usize>()
                )));
            }
        }
        match self.kind {
            ModelKind::LogisticRegression if !self.hidden.is_empty() => {
                return Err(ModelError::HiddenOnLinear(self.hidden.clone()));
            }
            ModelKind::Mlp if self.hidden.is_empty() => return Err(ModelError::NoHidden),
            _ => {}
        }
        if let Some(&w) = self.hidden.iter().find(|&&w| w == 0 || w > 65536) {
            return Err(ModelError::BadWidth(w));
        }
        let n = self.num_params(n_features);
        if n > MAX_PARAMS {
            return Err(ModelError::TooLarge(n));
        }
        Ok(())
    }

    /// `[model.init]` and `[model.lora]`: a conv net's checkpoint named inside the
    /// site's folder with a SHA-256, and adapters that fit its layers (the study's
    /// input and output widths: the head's shape depends on the classes).
    pub fn validate_fine_tuning(&self, io: Io) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::FineTune(m));
        let Some(ckpt) = &self.checkpoint else {
            if self.lora.is_some() {
                return bad(
                    "[model.lora] adapts a pretrained model: add [model.init] with its checkpoint (file, sha256)"
                        .into(),
                );
            }
            return Ok(());
        };
        if self.kind != ModelKind::Cnn {
            return bad("[model.init] and [model.lora] fine-tune a conv net (kind = \"cnn\")".into());
        }
        if !crate::lora::bare_file_name(&ckpt.file) {
            return bad(format!(
                "model.init.file = {:?}: give a bare file name; each site looks for it in its own checkpoints folder",
                ckpt.file
            ));
        }
        if ckpt.sha256.len() != 64 || !ckpt.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(format!(
                "model.init.sha256 = {:?}: give the checkpoint's SHA-256 as 64 hex digits (sha256sum {})",
                ckpt.sha256, ckpt.file
            ));
        }
        let Some(lora) = &self.lora else { return Ok(()) };
        if let Some(i) = self.conv.iter().position(|b| b.norm == Norm::Batch) {
            return bad(format!(
                "model.conv[{i}].norm = \"batch\" with [model.lora]: the frozen running statistics would not follow the adapted layers; use \"group\" or \"layer\", or fine-tune in full"
            ));
        }
        crate::lora::plan(&self.base_layout(io), Some(lora), &self.head_layer(io))
            .map(|_| ())
            .map_err(ModelError::FineTune)
    }

    fn validate_external(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::External(m));
        let Some(ext) = self.external.as_ref().filter(|_| self.kind == ModelKind::External) else {
            return bad("kind = \"external\" and a [model.external] section (trainer, tensors) go together".into());
        };
        if !self.hidden.is_empty() {
            return bad("an external model takes no `hidden`: its trainer defines its layers".into());
        }
        let name_ok = |s: &str| {
            !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
        };
        if !name_ok(&ext.trainer) {
            return bad(format!(
                "trainer name {:?}: use 1-128 letters, digits, '.', '_', '-' or '/'",
                ext.trainer
            ));
        }
        if ext.tensors.is_empty() {
            return bad("[model.external] lists no tensors".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &ext.tensors {
            if !name_ok(&t.name) || !seen.insert(t.name.as_str()) {
                return bad(format!("tensor name {:?} is empty, too long, odd or repeated", t.name));
            }
            if t.shape.is_empty() || t.shape.len() > 8 || t.shape.contains(&0) {
                return bad(format!(
                    "tensor {} has shape {:?}: 1 to 8 dimensions, none zero",
                    t.name, t.shape
                ));
            }
        }
        let n = ext
            .tensors
            .iter()
            .try_fold(0u64, |acc, t| {
                t.shape
                    .iter()
                    .try_fold(1u64, |p, d| p.checked_mul(*d))
                    .and_then(|l| acc.checked_add(l))
            })
            .unwrap_or(u64::MAX);
        if n > MAX_PARAMS {
            return Err(ModelError::TooLarge(n));
        }
        Ok(())
    }

    /// Returns `(in, out)` for each layer, input layer first, output (one logit, or one
    /// per class) last.
    pub fn layer_dims(&self, io: impl Into<Io>) -> Vec<(usize, usize)> {
        let io = io.into();
        let mut dims = Vec::with_capacity(self.hidden.len() + 1);
        let mut fan_in = io.inputs;
        for &h in &self.hidden {
            dims.push((fan_in, h));
            fan_in = h;
        }
        dims.push((fan_in, io.outputs.max(1)));
        dims
    }

    /// The conv net's shapes, for `kind = "cnn"` (an input of 1×1×inputs otherwise).
    pub fn cnn(&self, io: impl Into<Io>) -> Cnn<'_> {
        let io = io.into();
        Cnn {
            input: self.input.unwrap_or([1, 1, io.inputs]),
            blocks: &self.conv,
            hidden: &self.hidden,
            outputs: io.outputs,
        }
    }

    /// The tensors that travel and are aggregated: the network's ([`Self::base_layout`]),
    /// or for a fine-tuned model the offsets and adapters of [`crate::lora::plan`].
    pub fn layout(&self, io: impl Into<Io>) -> Vec<TensorSpec> {
        let io = io.into();
        match self.pieces(io) {
            Some(pieces) => pieces.into_iter().map(|p| p.tensor).collect(),
            None => self.base_layout(io),
        }
    }

    /// The output layer's name (`fc{j}`, the last dense layer of a conv net).
    pub fn head_layer(&self, io: impl Into<Io>) -> String {
        format!("fc{}", self.cnn(io).dense_dims().len() - 1)
    }

    /// A fine-tuned model's travelling tensors and what each adapts; `None` without a
    /// checkpoint (and empty for a `[model.lora]` that `validate` refuses).
    pub fn pieces(&self, io: impl Into<Io>) -> Option<Vec<Piece>> {
        self.checkpoint.as_ref()?;
        let io = io.into();
        Some(crate::lora::plan(&self.base_layout(io), self.lora.as_ref(), &self.head_layer(io)).unwrap_or_default())
    }

    /// The same network without its checkpoint: what a merged model's parameters
    /// ([`Self::merged`]) are scored with.
    pub fn base_spec(&self) -> ModelSpec {
        ModelSpec {
            checkpoint: None,
            lora: None,
            ..self.clone()
        }
    }

    /// The network's parameters from the checkpoint's values `base` (in
    /// [`Self::base_layout`]) and the study's travelling vector `travel`.
    pub fn merged(&self, io: impl Into<Io>, base: &[f32], travel: &[f32]) -> Result<Vec<f32>, ModelError> {
        let io = io.into();
        let want = self.base_layout(io).iter().map(TensorSpec::len).sum::<u64>() as usize;
        if base.len() != want {
            return Err(ModelError::WrongLength { got: base.len(), want });
        }
        let Some(pieces) = self.pieces(io) else {
            return Ok(base.to_vec());
        };
        let travelling = pieces.iter().map(|p| p.tensor.len()).sum::<u64>() as usize;
        if travel.len() != travelling {
            return Err(ModelError::WrongLength {
                got: travel.len(),
                want: travelling,
            });
        }
        let seed = self.lora.as_ref().map_or(0, |l| l.seed);
        Ok(crate::lora::merge(&self.base_layout(io), base, &pieces, seed, travel))
    }

    /// The network's own tensors, in order (what a checkpoint holds).
    pub fn base_layout(&self, n_features: impl Into<Io>) -> Vec<TensorSpec> {
        if let Some(ext) = &self.external {
            return ext.tensors.clone();
        }
        if self.kind == ModelKind::Cnn {
            return self
                .cnn(n_features)
                .tensors()
                .into_iter()
                .map(|(name, shape)| TensorSpec { name, shape })
                .collect();
        }
        self.layer_dims(n_features)
            .into_iter()
            .enumerate()
            .flat_map(|(i, (fan_in, fan_out))| {
                [
                    TensorSpec {
                        name: format!("layers.{i}.weight"),
                        shape: vec![fan_out as u64, fan_in as u64],
                    },
                    TensorSpec {
                        name: format!("layers.{i}.bias"),
                        shape: vec![fan_out as u64],
                    },
                ]
            })
            .collect()
    }

    pub fn num_params(&self, n_features: impl Into<Io>) -> u64 {
        if self.checkpoint.is_some() {
            return self.layout(n_features).iter().map(TensorSpec::len).sum();
        }
        if let Some(ext) = &self.external {
            return ext.tensors.iter().map(TensorSpec::len).sum();
        }
        if self.kind == ModelKind::Cnn {
            return self.cnn(n_features).num_params();
        }
        self.layer_dims(n_features)
            .iter()
            .map(|&(i, o)| (i as u64 + 1) * o as u64)
            .sum()
    }

    /// Returns the initial global model: zeros for logistic regression; for an MLP,
    /// weights uniform in ±1/√fan_in (the PyTorch `Linear` default) from `seed`, zero biases.
    pub fn init(&self, n_features: impl Into<Io>, seed: u64) -> Vec<f32> {
        let n_features = n_features.into();
        // Fine-tuning starts at the checkpoint: a zero offset, zero adapters.
        if self.checkpoint.is_some() {
            return vec![0.0; self.num_params(n_features) as usize];
        }
        let mut rng = StdRng::seed_from_u64(seed);
        if let Some(ext) = &self.external {
            let mut params = Vec::with_capacity(self.num_params(n_features) as usize);
            for t in &ext.tensors {
                let fan_in: u64 = t.shape.iter().skip(1).product();
                if t.shape.len() < 2 || ext.init == ExternalInit::Zeros {
                    params.extend(std::iter::repeat_n(0.0, t.len() as usize));
                } else {
                    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                    params.extend((0..t.len()).map(|_| rng.random_range(-bound..bound)));
                }
            }
            return params;
        }
        if self.kind == ModelKind::Cnn {
            return self.cnn(n_features).init(&mut rng);
        }
        let mut params = Vec::with_capacity(self.num_params(n_features) as usize);
        for (fan_in, fan_out) in self.layer_dims(n_features) {
            let bound = if self.kind == ModelKind::LogisticRegression {
                0.0
            } else {
                1.0 / (fan_in as f32).sqrt()
            };
            for _ in 0..fan_in * fan_out {
                params.push(if bound > 0.0 {
                    rng.random_range(-bound..bound)
                } else {
                    0.0
                });
            }
            params.extend(std::iter::repeat_n(0.0, fan_out));
        }
        params
    }

    /// Returns the logits of each row of `x` (row-major, `io.inputs` columns), row-major:
    /// `io.outputs` per row.
    pub fn logits(&self, params: &[f32], x: &[f32], io: impl Into<Io>) -> Result<Vec<f32>, ModelError> {
        if self.kind == ModelKind::External {
            return Err(ModelError::NoInference);
        }
        if self.checkpoint.is_some() {
            return Err(ModelError::FineTune(
                "a fine-tuned model's parameters are offsets from its checkpoint: merge them with it first (ModelSpec::merged)".into(),
            ));
        }
        let io = io.into();
        let n_features = io.inputs;
        let want = self.num_params(io) as usize;
        if params.len() != want {
            return Err(ModelError::WrongLength {
                got: params.len(),
                want,
            });
        }
        if self.kind == ModelKind::Cnn {
            let cnn = self.cnn(io);
            return Ok(x
                .chunks_exact(n_features)
                .flat_map(|image| cnn.logits(params, image))
                .collect());
        }
        let dims = self.layer_dims(io);
        let rows = x.len() / n_features;
        let mut out = Vec::with_capacity(rows * io.outputs.max(1));
        let mut act = Vec::new();
        let mut next = Vec::new();
        for row in x.chunks_exact(n_features) {
            act.clear();
            act.extend_from_slice(row);
            let mut at = 0;
            for (layer, &(fan_in, fan_out)) in dims.iter().enumerate() {
                let w = &params[at..at + fan_in * fan_out];
                let b = &params[at + fan_in * fan_out..at + (fan_in + 1) * fan_out];
                at += (fan_in + 1) * fan_out;
                next.clear();
                for o in 0..fan_out {
                    let z: f32 = w[o * fan_in..(o + 1) * fan_in]
                        .iter()
                        .zip(&act)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        + b[o];
                    let last = layer + 1 == dims.len();
                    next.push(if last { z } else { z.max(0.0) });
                }
                std::mem::swap(&mut act, &mut next);
            }
            out.extend_from_slice(&act);
        }
        Ok(out)
    }

    /// Returns P(label = 1) for each row of a binary model, or each row's class
    /// probabilities (softmax, `io.outputs` per row) of a multi-class one.
    pub fn predict_proba(&self, params: &[f32], x: &[f32], io: impl Into<Io>) -> Result<Vec<f32>, ModelError> {
        let io = io.into();
        let mut z = self.logits(params, x, io)?;
        if io.outputs <= 1 {
            z.iter_mut().for_each(|v| *v = sigmoid(*v));
        } else {
            z.chunks_exact_mut(io.outputs).for_each(softmax_in_place);
        }
        Ok(z)
    }
}

/// `softmax(z)_k = e^{z_k − max z} / Σ_j e^{z_j − max z}`, in place.
pub fn softmax_in_place(z: &mut [f32]) {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        total += *v;
    }
    z.iter_mut().for_each(|v| *v /= total);
}

pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// A per-feature affine standardization `x_std = (x - center) / scale`, computed by a
/// site from its own rows and never sent anywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    pub center: Vec<f32>,
    pub scale: Vec<f32>,
}

impl Standardizer {
    /// Fits mean and standard deviation per column; a constant column gets scale 1.
    pub fn fit(x: &[f32], n_features: usize) -> Self {
        let rows = (x.len() / n_features).max(1) as f64;
        let mut mean = vec![0f64; n_features];
        for row in x.chunks_exact(n_features) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += *v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= rows);
        let mut var = vec![0f64; n_features];
        for row in x.chunks_exact(n_features) {
            for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (*v as f64 - m).powi(2);
            }
        }
        let scale = var
            .iter()
            .map(|s| {
                let sd = (s / rows).sqrt();
                if sd > 1e-12 { sd as f32 } else { 1.0 }
            })
            .collect();
        Standardizer {
            center: mean.into_iter().map(|m| m as f32).collect(),
            scale,
        }
    }

    pub fn apply(&self, x: &mut [f32]) {
        let d = self.center.len();
        for row in x.chunks_exact_mut(d) {
            for ((v, c), s) in row.iter_mut().zip(&self.center).zip(&self.scale) {
                *v = (*v - c) / s;
            }
        }
    }

    /// The input layer's `(in, out)`: an MLP's first hidden width, or for logistic
    /// regression its outputs, `params_len / (in + 1)` (one logit or one per class).
    fn first_layer(&self, spec: &ModelSpec, params_len: usize) -> (usize, usize) {
        let d = self.center.len();
        match spec.hidden.first() {
            Some(&h) => (d, h),
            None => (d, (params_len / (d + 1)).max(1)),
        }
    }

    /// Rewrites the input layer of `params` (a model on raw features) into the
    /// equivalent model on standardized features: `W' = W·diag(s)`, `b' = b + W·c`.
    pub fn raw_to_standardized(&self, spec: &ModelSpec, params: &mut [f32]) {
        if spec.kind == ModelKind::Cnn {
            // A conv net reads the image study's public normalisation, never a site's
            // own scale (its kernels share weights across pixels, so no per-input
            // change of coordinates exists); its scaling is the identity.
            return;
        }
        let (fan_in, fan_out) = self.first_layer(spec, params.len());
        let (w, rest) = params.split_at_mut(fan_in * fan_out);
        for o in 0..fan_out {
            let row = &mut w[o * fan_in..(o + 1) * fan_in];
            let shift: f32 = row.iter().zip(&self.center).map(|(w, c)| w * c).sum();
            rest[o] += shift;
            row.iter_mut().zip(&self.scale).for_each(|(w, s)| *w *= s);
        }
    }

    /// The inverse of [`Standardizer::raw_to_standardized`]: `W = W'·diag(1/s)`,
    /// `b = b' − W·c`.
    pub fn standardized_to_raw(&self, spec: &ModelSpec, params: &mut [f32]) {
        if spec.kind == ModelKind::Cnn {
            // A conv net reads the image study's public normalisation, never a site's
            // own scale (its kernels share weights across pixels, so no per-input
            // change of coordinates exists); its scaling is the identity.
            return;
        }
        let (fan_in, fan_out) = self.first_layer(spec, params.len());
        let (w, rest) = params.split_at_mut(fan_in * fan_out);
        for o in 0..fan_out {
            let row = &mut w[o * fan_in..(o + 1) * fan_in];
            row.iter_mut().zip(&self.scale).for_each(|(w, s)| *w /= s);
            let shift: f32 = row.iter().zip(&self.center).map(|(w, c)| w * c).sum();
            rest[o] -= shift;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp() -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Mlp,
            hidden: vec![4, 3],
            external: None,
            input: None,
            conv: Vec::new(),
            checkpoint: None,
            lora: None,
        }
    }

    #[test]
    fn layout_matches_param_count() {
        let spec = mlp();
        let total: u64 = spec.layout(5).iter().map(TensorSpec::len).sum();
        assert_eq!(total, spec.num_params(5));
        assert_eq!(spec.num_params(5), (5 + 1) * 4 + (4 + 1) * 3 + (3 + 1));
        assert_eq!(spec.init(5, 1).len() as u64, spec.num_params(5));
    }

    #[test]
    fn validation_refuses_inconsistent_specs() {
        let lr = ModelSpec {
            kind: ModelKind::LogisticRegression,
            hidden: vec![3],
            external: None,
            input: None,
            conv: Vec::new(),
            checkpoint: None,
            lora: None,
        };
        assert!(matches!(lr.validate(4), Err(ModelError::HiddenOnLinear(_))));
        let mlp0 = ModelSpec {
            kind: ModelKind::Mlp,
            hidden: vec![],
            external: None,
            input: None,
            conv: Vec::new(),
            checkpoint: None,
            lora: None,
        };
        assert_eq!(mlp0.validate(4), Err(ModelError::NoHidden));
        assert_eq!(mlp().validate(0), Err(ModelError::NoFeatures));
    }

    #[test]
    fn standardization_change_of_coordinates_preserves_predictions() {
        let spec = mlp();
        let d = 5;
        let x: Vec<f32> = (0..40).map(|i| (i as f32 * 1.7).sin() * 100.0 + i as f32).collect();
        let std = Standardizer::fit(&x, d);
        let raw = spec.init(d, 9);
        let before = spec.logits(&raw, &x, d).expect("valid model");

        let mut on_std = raw.clone();
        std.raw_to_standardized(&spec, &mut on_std);
        let mut xs = x.clone();
        std.apply(&mut xs);
        let after = spec.logits(&on_std, &xs, d).expect("valid model");
        for (a, b) in before.iter().zip(&after) {
            assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
        }

        let mut back = on_std.clone();
        std.standardized_to_raw(&spec, &mut back);
        for (a, b) in raw.iter().zip(&back) {
            assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }
}
