//! The conv-net family (`kind = "cnn"`): convolution blocks over an image input
//! (`channels × height × width`, channel-major), then dense layers, then one logit or
//! one per class. Each block is a `kernel × kernel` convolution with stride 1 and "same"
//! zero padding, an optional normalisation, ReLU, and an optional `pool × pool` max pool
//! (stride `pool`, floor). The flat parameter layout is, per block, `conv{i}.weight
//! [out, in, k, k]`, `conv{i}.bias [out]` and with a group or layer norm `norm{i}.weight
//! [out]`, `norm{i}.bias [out]`; then `fc{j}.weight [out, in]`, `fc{j}.bias [out]`.
//!
//! This file holds the family's shapes, its initialisation and a plain inference pass
//! (evaluation, the demo's scoring, tests); training is candle's, at the site agent.
//!
//! Group normalisation (Wu and He, ECCV 2018, eq. 1–3, ε = 1e-5) normalises each
//! example's channel groups over their channels and pixels, so every example's output
//! depends on that example alone: per-example gradients exist and DP-SGD applies.
//! `layer` is group norm with one group (as PyTorch's `GroupNorm(1, C)`). Batch norm
//! (Ioffe and Szegedy, ICML 2015, Algorithm 1; ε = 1e-5, momentum 0.1 as PyTorch) trains
//! on each batch's per-channel statistics and keeps running means and variances, which
//! inference reads; the running statistics are tensors of the layout (`norm{i}.running_mean`,
//! `norm{i}.running_var`), averaged by FedAvg like the weights. It mixes a batch's
//! examples, so it has no per-example gradients, and its running statistics would leave
//! un-noised: a study under DP-SGD (record-level privacy) refuses it, as Opacus does.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Group norm's ε (Wu and He 2018; PyTorch's default).
pub const NORM_EPS: f32 = 1e-5;

/// One convolution block of `[[model.conv]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvBlock {
    /// Output channels.
    pub channels: usize,
    /// Kernel side (odd: "same" padding of `kernel / 2`).
    #[serde(default = "default_kernel")]
    pub kernel: usize,
    #[serde(default)]
    pub norm: Norm,
    /// Channel groups of a group norm (must divide `channels`).
    #[serde(default = "default_groups")]
    pub groups: usize,
    /// Max-pool side after the activation; 1 is none.
    #[serde(default = "default_pool")]
    pub pool: usize,
}

fn default_kernel() -> usize {
    3
}

fn default_groups() -> usize {
    1
}

fn default_pool() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    #[default]
    None,
    Group,
    Layer,
    Batch,
}

impl ConvBlock {
    /// The groups its norm uses, when it has one.
    pub fn norm_groups(&self) -> Option<usize> {
        match self.norm {
            Norm::Group => Some(self.groups),
            Norm::Layer => Some(1),
            Norm::None | Norm::Batch => None,
        }
    }

    /// Whether it has a norm's scale and shift.
    pub fn has_affine(&self) -> bool {
        self.norm != Norm::None
    }
}

/// A conv net's shapes: its input, blocks, dense widths and outputs.
#[derive(Debug, Clone, Copy)]
pub struct Cnn<'a> {
    pub input: [usize; 3],
    pub blocks: &'a [ConvBlock],
    pub hidden: &'a [usize],
    pub outputs: usize,
}

impl Cnn<'_> {
    /// Each block's output shape `[channels, height, width]`.
    pub fn block_shapes(&self) -> Vec<[usize; 3]> {
        let [_, mut h, mut w] = self.input;
        self.blocks
            .iter()
            .map(|b| {
                let p = b.pool.max(1);
                (h, w) = (h / p, w / p);
                [b.channels, h, w]
            })
            .collect()
    }

    /// The dense part's input width: the last block's values.
    pub fn flat(&self) -> usize {
        self.block_shapes()
            .last()
            .map_or(self.input.iter().product(), |s| s.iter().product())
    }

    /// The dense layers as `(in, out)`, the output layer last.
    pub fn dense_dims(&self) -> Vec<(usize, usize)> {
        let mut fan_in = self.flat();
        let mut dims = Vec::with_capacity(self.hidden.len() + 1);
        for &h in self.hidden {
            dims.push((fan_in, h));
            fan_in = h;
        }
        dims.push((fan_in, self.outputs.max(1)));
        dims
    }

    /// The tensors in layout order: name and shape.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let mut out = Vec::new();
        let mut c_in = self.input[0];
        for (i, b) in self.blocks.iter().enumerate() {
            let (o, k) = (b.channels as u64, b.kernel as u64);
            out.push((format!("conv{i}.weight"), vec![o, c_in as u64, k, k]));
            out.push((format!("conv{i}.bias"), vec![o]));
            if b.has_affine() {
                out.push((format!("norm{i}.weight"), vec![o]));
                out.push((format!("norm{i}.bias"), vec![o]));
            }
            if b.norm == Norm::Batch {
                out.push((format!("norm{i}.running_mean"), vec![o]));
                out.push((format!("norm{i}.running_var"), vec![o]));
            }
            c_in = b.channels;
        }
        for (j, (fan_in, fan_out)) in self.dense_dims().into_iter().enumerate() {
            out.push((format!("fc{j}.weight"), vec![fan_out as u64, fan_in as u64]));
            out.push((format!("fc{j}.bias"), vec![fan_out as u64]));
        }
        out
    }

    pub fn num_params(&self) -> u64 {
        self.tensors().iter().map(|(_, s)| s.iter().product::<u64>()).sum()
    }

    /// Why the shapes do not make a net, if they do not.
    pub fn check(&self) -> Result<(), String> {
        let [c, h, w] = self.input;
        if c == 0 || h == 0 || w == 0 {
            return Err(format!(
                "model.input = {:?}: every dimension must be at least 1",
                self.input
            ));
        }
        if self.blocks.is_empty() {
            return Err("a cnn needs at least one [[model.conv]] block".into());
        }
        let (mut h, mut w) = (h, w);
        for (i, b) in self.blocks.iter().enumerate() {
            if b.channels == 0 || b.channels > 4096 {
                return Err(format!("model.conv[{i}].channels = {} is outside 1..=4096", b.channels));
            }
            if b.kernel % 2 == 0 || b.kernel > 15 {
                return Err(format!(
                    "model.conv[{i}].kernel = {}: give an odd side up to 15 (\"same\" padding)",
                    b.kernel
                ));
            }
            if b.norm == Norm::Group && (b.groups == 0 || b.channels % b.groups != 0) {
                return Err(format!(
                    "model.conv[{i}].groups = {} must divide its {} channels",
                    b.groups, b.channels
                ));
            }
            let p = b.pool.max(1);
            if p > h || p > w {
                return Err(format!("model.conv[{i}].pool = {p} is larger than its {h}×{w} input"));
            }
            (h, w) = (h / p, w / p);
        }
        Ok(())
    }

    /// The initial parameters: convolution and dense weights uniform in ±1/√fan_in
    /// (fan_in = in × k × k for a convolution; PyTorch's default bound), biases zero,
    /// norm scales one and shifts zero.
    pub fn init(&self, rng: &mut impl Rng) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.num_params() as usize);
        for (name, shape) in self.tensors() {
            let len: u64 = shape.iter().product();
            if name.starts_with("norm") && (name.ends_with("weight") || name.ends_with("running_var")) {
                out.extend(std::iter::repeat_n(1.0, len as usize));
            } else if shape.len() >= 2 {
                let fan_in: u64 = shape[1..].iter().product();
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                out.extend((0..len).map(|_| rng.random_range(-bound..bound)));
            } else {
                out.extend(std::iter::repeat_n(0.0, len as usize));
            }
        }
        out
    }

    /// One image's logits (`input` values, channel-major) from `params`.
    pub fn logits(&self, params: &[f32], image: &[f32]) -> Vec<f32> {
        let mut at = 0;
        let mut take = |n: usize| {
            let s = &params[at..at + n];
            at += n;
            s
        };
        let [mut c, mut h, mut w] = self.input;
        let mut act = image.to_vec();
        for b in self.blocks {
            let (o, k) = (b.channels, b.kernel);
            let weight = take(o * c * k * k);
            let bias = take(o);
            let mut z = conv_same(&act, c, h, w, weight, bias, o, k);
            if let Some(groups) = b.norm_groups() {
                let (gamma, beta) = (take(o), take(o));
                group_norm(&mut z, o, h * w, groups, gamma, beta);
            } else if b.norm == Norm::Batch {
                // Inference reads the running statistics.
                let (gamma, beta, mean, var) = (take(o), take(o), take(o), take(o));
                for ch in 0..o {
                    let inv = 1.0 / (var[ch] + NORM_EPS).sqrt();
                    for v in &mut z[ch * h * w..(ch + 1) * h * w] {
                        *v = (*v - mean[ch]) * inv * gamma[ch] + beta[ch];
                    }
                }
            }
            z.iter_mut().for_each(|v| *v = v.max(0.0));
            let p = b.pool.max(1);
            if p > 1 {
                z = max_pool(&z, o, h, w, p);
                (h, w) = (h / p, w / p);
            }
            act = z;
            c = o;
        }
        let dims = self.dense_dims();
        for (j, (fan_in, fan_out)) in dims.iter().copied().enumerate() {
            let weight = take(fan_in * fan_out);
            let bias = take(fan_out);
            let last = j + 1 == dims.len();
            act = (0..fan_out)
                .map(|r| {
                    let z = weight[r * fan_in..(r + 1) * fan_in]
                        .iter()
                        .zip(&act)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        + bias[r];
                    if last { z } else { z.max(0.0) }
                })
                .collect();
        }
        act
    }
}

/// A stride-1 convolution with zero padding `k / 2` ("same"), channel-major.
#[allow(clippy::too_many_arguments)] // the shapes of a convolution, all needed
fn conv_same(x: &[f32], c: usize, h: usize, w: usize, weight: &[f32], bias: &[f32], o: usize, k: usize) -> Vec<f32> {
    let pad = (k / 2) as isize;
    let mut out = vec![0f32; o * h * w];
    for oc in 0..o {
        let plane = &mut out[oc * h * w..(oc + 1) * h * w];
        plane.iter_mut().for_each(|v| *v = bias[oc]);
        for ic in 0..c {
            let input = &x[ic * h * w..(ic + 1) * h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let wv = weight[((oc * c + ic) * k + ky) * k + kx];
                    for y in 0..h {
                        let sy = y as isize + ky as isize - pad;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        for xx in 0..w {
                            let sx = xx as isize + kx as isize - pad;
                            if sx >= 0 && sx < w as isize {
                                plane[y * w + xx] += wv * input[sy as usize * w + sx as usize];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Group norm in place over `c` channels of `hw` values each.
fn group_norm(z: &mut [f32], c: usize, hw: usize, groups: usize, gamma: &[f32], beta: &[f32]) {
    let per = c / groups.max(1);
    for g in 0..groups {
        let span = &mut z[g * per * hw..(g + 1) * per * hw];
        let n = span.len() as f32;
        let mean = span.iter().sum::<f32>() / n;
        let var = span.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + NORM_EPS).sqrt();
        for (i, v) in span.iter_mut().enumerate() {
            let ch = g * per + i / hw;
            *v = (*v - mean) * inv * gamma[ch] + beta[ch];
        }
    }
}

/// `p × p` max pooling with stride `p` (floor), channel-major.
fn max_pool(z: &[f32], c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (oh, ow) = (h / p, w / p);
    let mut out = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        for y in 0..oh {
            for x in 0..ow {
                let mut m = f32::NEG_INFINITY;
                for dy in 0..p {
                    for dx in 0..p {
                        m = m.max(z[ch * h * w + (y * p + dy) * w + x * p + dx]);
                    }
                }
                out.push(m);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_layout() {
        let blocks = [
            ConvBlock {
                channels: 8,
                kernel: 3,
                norm: Norm::Group,
                groups: 4,
                pool: 2,
            },
            ConvBlock {
                channels: 16,
                kernel: 3,
                norm: Norm::None,
                groups: 1,
                pool: 2,
            },
        ];
        let cnn = Cnn {
            input: [1, 8, 8],
            blocks: &blocks,
            hidden: &[32],
            outputs: 10,
        };
        assert_eq!(cnn.block_shapes(), vec![[8, 4, 4], [16, 2, 2]]);
        assert_eq!(cnn.flat(), 64);
        let names: Vec<String> = cnn.tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "conv0.weight",
                "conv0.bias",
                "norm0.weight",
                "norm0.bias",
                "conv1.weight",
                "conv1.bias",
                "fc0.weight",
                "fc0.bias",
                "fc1.weight",
                "fc1.bias"
            ]
        );
        let expected = 8 * 9 + 8 + 8 + 8 + 16 * 8 * 9 + 16 + 64 * 32 + 32 + 32 * 10 + 10;
        assert_eq!(cnn.num_params(), expected);
        assert!(cnn.check().is_ok());
    }

    #[test]
    fn a_one_by_one_identity_convolution_passes_the_image_through() {
        let blocks = [ConvBlock {
            channels: 1,
            kernel: 1,
            norm: Norm::None,
            groups: 1,
            pool: 1,
        }];
        let cnn = Cnn {
            input: [1, 2, 2],
            blocks: &blocks,
            hidden: &[],
            outputs: 1,
        };
        // conv weight 1, bias 0; dense weights [1, 2, 3, 4], bias 0.5.
        let params = [1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.5];
        let z = cnn.logits(&params, &[1.0, -1.0, 2.0, 0.0]);
        // ReLU drops the −1: 1·1 + 2·0 + 3·2 + 4·0 + 0.5.
        assert_eq!(z, vec![7.5]);
    }

    #[test]
    fn bad_shapes_are_refused_by_name() {
        let mut block = ConvBlock {
            channels: 6,
            kernel: 3,
            norm: Norm::Batch,
            groups: 1,
            pool: 1,
        };
        let cnn = |b: &[ConvBlock]| {
            Cnn {
                input: [1, 8, 8],
                blocks: b,
                hidden: &[],
                outputs: 2,
            }
            .check()
        };
        assert!(cnn(&[block]).is_ok(), "batch norm without DP");
        block.norm = Norm::Group;
        block.groups = 4;
        assert!(
            cnn(&[block])
                .expect_err("groups")
                .contains("must divide its 6 channels")
        );
        block.groups = 3;
        block.kernel = 4;
        assert!(cnn(&[block]).expect_err("kernel").contains("odd side"));
        block.kernel = 3;
        block.pool = 16;
        assert!(cnn(&[block]).expect_err("pool").contains("larger than its 8×8"));
    }
}
