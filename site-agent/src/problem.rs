//! What a local training problem is, for every trainer: the model's layers as candle
//! tensors, how to read the starting parameters, and the optimizer's constants. Plain
//! training (`train`) and DP-SGD (`dpsgd`) both build on it and on nothing of each other.

use candle_core::{Device, Tensor, Var};
use medfl_shared::manifest::Training;
use medfl_shared::model::ModelSpec;

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
/// with their labels, and the manifest's training settings.
#[derive(Debug, Clone, Copy)]
pub struct LocalProblem<'a> {
    pub spec: &'a ModelSpec,
    pub n_features: usize,
    pub params: &'a [f32],
    pub start_on: Start,
    pub x: &'a [f32],
    pub y: &'a [f32],
    pub training: &'a Training,
}

/// Adam's constants (Kingma and Ba 2015, Algorithm 1).
pub(crate) const BETA1: f64 = 0.9;
pub(crate) const BETA2: f64 = 0.999;
pub(crate) const ADAM_EPS: f64 = 1e-8;

/// Splits flat parameters into each layer's (weight [out, in], bias [out]) tensors.
pub(crate) fn layer_tensors(
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

pub(crate) fn layer_vars(
    spec: &ModelSpec,
    n_features: usize,
    params: &[f32],
    dev: &Device,
) -> candle_core::Result<Vec<(Var, Var)>> {
    layer_tensors(spec, n_features, params, dev)?
        .into_iter()
        .map(|(w, b)| Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?)))
        .collect()
}
