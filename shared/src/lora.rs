//! Fine-tuning a pretrained checkpoint (`[model.init]`), in full or through LoRA
//! adapters (`[model.lora]`): what travels, how it is drawn and how it merges back.
//!
//! **What travels is an offset from the checkpoint.** Each site holds the checkpoint
//! (its SHA-256 is in the manifest); the coordinator never needs it. The study's model
//! is the tensors of [`plan`], all zero at the start:
//! - full fine-tuning (`init` without `lora`): every tensor of the network, as its
//!   difference from the checkpoint's;
//! - LoRA: for each target layer, the adapter `B` (`{layer}.lora_b`, `[out, rank]`), and
//!   with `head = true` the output layer's weight and bias as differences.
//!
//! FedAvg, server optimisers, DP and secure aggregation all act on that vector as on any
//! model; shifting every site's vector by the same checkpoint changes none of them.
//!
//! **LoRA** (Hu et al., ICLR 2022, eq. 3): a target layer's weight `W₀ [out, in]` (a
//! convolution's `[out, in, k, k]` read as `[out, in·k·k]`) becomes `W₀ + (α/r)·B·A`
//! with `A [r, in]`, `B [out, r]`, rank `r`, scale `α/r`.
//!
//! **Averaging adapters is not averaging their product**: `mean(B)·mean(A) ≠ mean(B·A)`
//! when both are trained. medfl follows FFA-LoRA (Sun, Qin, Li, Ding; "Improving LoRA in
//! privacy-preserving federated learning", ICLR 2024, §4): `A` is drawn once from the
//! manifest's `lora.seed` and frozen at every site, and only `B` is trained. Then
//! `mean(B)·A = mean(B·A)` exactly, so FedAvg of the adapters is FedAvg of the updates
//! they make. It halves what travels and is noised (DP noise scales with the trained
//! dimension), and it costs expressiveness: the update of each layer lies in the
//! row space of one random `A` (rank `r`), where LoRA could rotate `A` towards the
//! task. Sun et al. report it matching or beating LoRA under DP; a larger `r` buys back
//! what the frozen `A` loses.
//!
//! `A` is uniform in ±1/√in (as PEFT's default Kaiming-uniform with `a = √5`), drawn from
//! the project's one PRG ([`crate::prg`], AES-128-CTR) under the key
//! `SHA-256("medfl lora A" ‖ seed (u64 LE) ‖ tensor name)`: every site, whatever its
//! platform or medfl version, draws the same `A`. `B` starts at zero (Hu et al.), so the
//! study's initial model is the checkpoint itself.

use serde::{Deserialize, Serialize};

use crate::layout::TensorSpec;

/// `[model.init]`: the safetensors checkpoint each site holds, by file name (in the
/// agent's `checkpoints` folder) and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub file: String,
    pub sha256: String,
}

/// `[model.lora]`: low-rank adapters on the named layers (`conv{i}`, `fc{j}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    pub rank: usize,
    /// The scale's numerator: the update is `(alpha / rank)·B·A`. Default: `rank`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<u32>,
    pub targets: Vec<String>,
    /// Also train the output layer (in full, as an offset from the checkpoint's).
    #[serde(default)]
    pub head: bool,
    /// Draws the frozen `A` matrices.
    #[serde(default)]
    pub seed: u64,
}

impl Lora {
    /// `α / r` (Hu et al. 2022, §4.1).
    pub fn scale(&self) -> f32 {
        self.alpha.unwrap_or(self.rank as u32) as f32 / self.rank.max(1) as f32
    }
}

/// How one travelling tensor acts on the network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// Added to the base tensor of the same shape.
    Offset,
    /// LoRA's `B [out, rank]`: adds `scale·B·A` to the base weight read as `[out, fan_in]`.
    LoraB { rank: usize, fan_in: usize, scale: f32 },
}

/// One travelling tensor: its name and shape, the network tensor it adapts (index into
/// the base layout) and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub tensor: TensorSpec,
    pub base: usize,
    pub role: Role,
}

/// The layer a tensor belongs to: `conv0.weight` → `conv0`.
pub fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(layer, _)| layer)
}

/// The travelling tensors for a network with `base` layout, fine-tuned in full
/// (`lora: None`) or through `lora`; `head` is the output layer's name. Errors say what
/// in `[model.lora]` does not fit the network, naming the layers it has.
pub fn plan(base: &[TensorSpec], lora: Option<&Lora>, head: &str) -> Result<Vec<Piece>, String> {
    let Some(lora) = lora else {
        return Ok(base
            .iter()
            .enumerate()
            .map(|(i, t)| Piece {
                tensor: t.clone(),
                base: i,
                role: Role::Offset,
            })
            .collect());
    };
    let layers: Vec<&str> = base
        .iter()
        .filter(|t| t.name.ends_with(".weight") && t.shape.len() >= 2)
        .map(|t| layer_of(&t.name))
        .collect();
    if lora.rank == 0 {
        return Err("lora.rank = 0: give a rank of at least 1".into());
    }
    if lora.alpha == Some(0) {
        return Err("lora.alpha = 0 would make every adapter do nothing".into());
    }
    if lora.targets.is_empty() && !lora.head {
        return Err("[model.lora] names no targets and no head: nothing would be trained".into());
    }
    for (i, t) in lora.targets.iter().enumerate() {
        if !layers.contains(&t.as_str()) {
            return Err(format!(
                "lora.targets[{i}] = {t:?} is not a linear or conv layer of this model; its layers are {}",
                layers.join(", ")
            ));
        }
        if lora.targets[..i].contains(t) {
            return Err(format!("lora.targets names {t:?} twice"));
        }
        if lora.head && t == head {
            return Err(format!(
                "lora.targets names {t:?}, the output layer, and lora.head = true trains it in full: keep one"
            ));
        }
    }
    let mut pieces = Vec::new();
    for (i, t) in base.iter().enumerate() {
        let layer = layer_of(&t.name);
        if t.name.ends_with(".weight") && lora.targets.iter().any(|x| x == layer) {
            let out = t.shape[0] as usize;
            let fan_in = t.shape[1..].iter().product::<u64>() as usize;
            if lora.rank > out.min(fan_in) {
                return Err(format!(
                    "lora.rank = {} is above layer {layer}'s dimension: its weight {:?} is {out} × {fan_in} as a matrix, so the rank is at most {}",
                    lora.rank,
                    t.shape,
                    out.min(fan_in)
                ));
            }
            pieces.push(Piece {
                tensor: TensorSpec {
                    name: format!("{layer}.lora_b"),
                    shape: vec![out as u64, lora.rank as u64],
                },
                base: i,
                role: Role::LoraB {
                    rank: lora.rank,
                    fan_in,
                    scale: lora.scale(),
                },
            });
        } else if lora.head && layer == head {
            pieces.push(Piece {
                tensor: t.clone(),
                base: i,
                role: Role::Offset,
            });
        }
    }
    Ok(pieces)
}

/// The frozen `A [rank, fan_in]` (row-major) of the adapter on the weight `weight_name`
/// (module docs: uniform ±1/√fan_in from the project's PRG).
pub fn lora_a(seed: u64, weight_name: &str, rank: usize, fan_in: usize) -> Vec<f32> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"medfl lora A");
    ctx.update(&seed.to_le_bytes());
    ctx.update(weight_name.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    let mut words = vec![0u32; rank * fan_in];
    crate::prg::add_keystream(&key, 0, &mut words, false);
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    words
        .into_iter()
        .map(|w| (((f64::from(w) + 0.5) / 4_294_967_296.0 * 2.0 - 1.0) * bound) as f32)
        .collect()
}

/// The network's parameters (base layout) from the checkpoint's `base` and the
/// travelling vector `travel` laid out as `pieces`.
pub fn merge(base_layout: &[TensorSpec], base: &[f32], pieces: &[Piece], seed: u64, travel: &[f32]) -> Vec<f32> {
    let mut offsets = Vec::with_capacity(base_layout.len());
    let mut at = 0usize;
    for t in base_layout {
        offsets.push(at);
        at += t.len() as usize;
    }
    let mut out = base.to_vec();
    let mut from = 0usize;
    for p in pieces {
        let len = p.tensor.len() as usize;
        let values = &travel[from..from + len];
        from += len;
        let start = offsets[p.base];
        match p.role {
            Role::Offset => out[start..start + len]
                .iter_mut()
                .zip(values)
                .for_each(|(w, d)| *w += d),
            Role::LoraB { rank, fan_in, scale } => {
                let a = lora_a(seed, &base_layout[p.base].name, rank, fan_in);
                let rows = len / rank;
                for r in 0..rows {
                    let b_row = &values[r * rank..(r + 1) * rank];
                    let w_row = &mut out[start + r * fan_in..start + (r + 1) * fan_in];
                    for (k, &b) in b_row.iter().enumerate() {
                        if b == 0.0 {
                            continue;
                        }
                        let a_row = &a[k * fan_in..(k + 1) * fan_in];
                        w_row.iter_mut().zip(a_row).for_each(|(w, a)| *w += scale * b * a);
                    }
                }
            }
        }
    }
    out
}

/// Whether `name` is a bare file name (no folder, not `.` or `..`): a manifest names a
/// checkpoint inside the site's own folder and can point nowhere else.
pub fn bare_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with('~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<TensorSpec> {
        let t = |name: &str, shape: &[u64]| TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        };
        vec![
            t("conv0.weight", &[4, 1, 3, 3]),
            t("conv0.bias", &[4]),
            t("fc0.weight", &[6, 16]),
            t("fc0.bias", &[6]),
            t("fc1.weight", &[3, 6]),
            t("fc1.bias", &[3]),
        ]
    }

    fn lora(targets: &[&str], rank: usize, head: bool) -> Lora {
        Lora {
            rank,
            alpha: Some(4),
            targets: targets.iter().map(|s| s.to_string()).collect(),
            head,
            seed: 9,
        }
    }

    #[test]
    fn the_plan_names_adapters_and_the_head() {
        let pieces = plan(&layout(), Some(&lora(&["conv0", "fc0"], 2, true)), "fc1").expect("plan");
        let names: Vec<(&str, &[u64])> = pieces
            .iter()
            .map(|p| (p.tensor.name.as_str(), p.tensor.shape.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                ("conv0.lora_b", &[4, 2][..]),
                ("fc0.lora_b", &[6, 2][..]),
                ("fc1.weight", &[3, 6][..]),
                ("fc1.bias", &[3][..])
            ]
        );
        assert_eq!(
            pieces[0].role,
            Role::LoraB {
                rank: 2,
                fan_in: 9,
                scale: 2.0
            }
        );
        // Full fine-tuning: every tensor, as an offset.
        assert_eq!(plan(&layout(), None, "fc1").expect("full").len(), 6);
    }

    #[test]
    fn lora_that_does_not_fit_is_refused_by_name() {
        let err = plan(&layout(), Some(&lora(&["conv3"], 2, false)), "fc1").expect_err("no such layer");
        assert!(err.contains("\"conv3\"") && err.contains("conv0, fc0, fc1"), "{err}");
        let err = plan(&layout(), Some(&lora(&["fc1"], 4, false)), "fc1").expect_err("rank");
        assert!(err.contains("at most 3") && err.contains("[3, 6]"), "{err}");
        let err = plan(&layout(), Some(&lora(&["conv0.bias"], 1, false)), "fc1").expect_err("a bias");
        assert!(err.contains("not a linear or conv layer"), "{err}");
        let err = plan(&layout(), Some(&lora(&["fc1"], 1, true)), "fc1").expect_err("head twice");
        assert!(err.contains("keep one"), "{err}");
        assert!(plan(&layout(), Some(&lora(&["fc0"], 0, false)), "fc1").is_err());
        assert!(plan(&layout(), Some(&lora(&[], 1, false)), "fc1").is_err());
    }

    #[test]
    fn a_is_fixed_by_seed_and_name_and_bounded() {
        let a = lora_a(9, "fc0.weight", 2, 16);
        assert_eq!(a, lora_a(9, "fc0.weight", 2, 16));
        assert_ne!(a, lora_a(10, "fc0.weight", 2, 16));
        assert_ne!(a, lora_a(9, "fc1.weight", 2, 16));
        assert!(a.iter().all(|v| v.abs() <= 0.25), "{a:?}");
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.1);
    }

    /// The merged weight is `W₀ + (α/r)·B·A`, and averaging B averages the products:
    /// `merge(mean B) = mean(merge(B))` (FFA-LoRA's point).
    #[test]
    fn merging_adds_the_scaled_product_and_commutes_with_averaging() {
        let base_layout = layout();
        let lora = lora(&["fc0"], 2, true);
        let pieces = plan(&base_layout, Some(&lora), "fc1").expect("plan");
        let n_base: usize = base_layout.iter().map(|t| t.len() as usize).sum();
        let base: Vec<f32> = (0..n_base).map(|i| (i as f32 * 0.37).sin()).collect();
        let n_travel: usize = pieces.iter().map(|p| p.tensor.len() as usize).sum();
        let b1: Vec<f32> = (0..n_travel).map(|i| (i as f32 * 0.11).cos()).collect();
        let b2: Vec<f32> = (0..n_travel).map(|i| (i as f32 * 0.23).sin()).collect();
        let merged = merge(&base_layout, &base, &pieces, lora.seed, &b1);
        // fc0.weight starts after conv0 (36 + 4 values); entry (r, c).
        let a = lora_a(lora.seed, "fc0.weight", 2, 16);
        let (r, c) = (4, 7);
        let want = base[40 + r * 16 + c] + 2.0 * (b1[r * 2] * a[c] + b1[r * 2 + 1] * a[16 + c]);
        assert!((merged[40 + r * 16 + c] - want).abs() < 1e-6);
        // Untouched tensors stay; the head is an offset.
        assert_eq!(merged[..40], base[..40]);
        assert!((merged[n_base - 1] - (base[n_base - 1] + b1[n_travel - 1])).abs() < 1e-6);
        let mean: Vec<f32> = b1.iter().zip(&b2).map(|(p, q)| (p + q) / 2.0).collect();
        let m1 = merged;
        let m2 = merge(&base_layout, &base, &pieces, lora.seed, &b2);
        let of_mean = merge(&base_layout, &base, &pieces, lora.seed, &mean);
        for ((x, y), z) in m1.iter().zip(&m2).zip(&of_mean) {
            assert!(((x + y) / 2.0 - z).abs() < 1e-5);
        }
    }

    #[test]
    fn checkpoint_names_stay_in_their_folder() {
        assert!(bare_file_name("digits04.safetensors"));
        for bad in ["", ".", "..", "../x", "/etc/passwd", "a\\b", "~root"] {
            assert!(!bare_file_name(bad), "{bad}");
        }
    }
}
