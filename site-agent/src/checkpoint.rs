//! The pretrained checkpoint a fine-tuning study names (`[model.init]`, see
//! [`medfl_shared::lora`]): read from the agent's own `checkpoints` folder (a manifest
//! gives a bare file name and can point nowhere else), checked against the manifest's
//! SHA-256, and matched to the network's tensors by name and shape.
//!
//! The checkpoint's weights are not covered by the study's ledger: it must be public, or
//! itself trained under DP (the README says so). Its refusals name tensors and shapes,
//! which are the model's public layout, never data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use medfl_shared::model::{Checkpoint, TensorSpec};
use safetensors::{Dtype, SafeTensors};

/// Why a checkpoint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("checkpoint {file:?} is not in this site's checkpoints folder {folder}")]
    Missing { file: String, folder: String },
    #[error("checkpoint {file:?} could not be read: {why}")]
    Read { file: String, why: String },
    #[error("checkpoint {file:?} has SHA-256 {got}, the manifest says {want}: this site holds a different file")]
    HashMismatch { file: String, want: String, got: String },
    #[error("checkpoint {file:?} is not a safetensors file ({why})")]
    NotSafetensors { file: String, why: String },
    #[error("checkpoint {file:?} has no tensor {name} {shape:?}, which the model needs; it holds {holds}")]
    MissingTensor {
        file: String,
        name: String,
        shape: Vec<u64>,
        holds: String,
    },
    #[error("checkpoint {file:?}: tensor {name} is {has:?}, the model needs {needs:?}")]
    Shape {
        file: String,
        name: String,
        has: Vec<u64>,
        needs: Vec<u64>,
    },
    #[error("checkpoint {file:?}: tensor {name} is {dtype}; medfl reads F32 checkpoints (convert it)")]
    Dtype { file: String, name: String, dtype: String },
    #[error("checkpoint {file:?} holds tensors the model has no place for: {names}")]
    Extra { file: String, names: String },
}

/// Largest safetensors header accepted beyond the tensors' bytes (its JSON).
const HEADER_SLACK: u64 = 16 << 20;

/// Reads `ckpt` from `folder` and returns its values in `layout`'s order, or why not.
pub fn load(folder: &Path, ckpt: &Checkpoint, layout: &[TensorSpec]) -> Result<Vec<f32>, CheckpointError> {
    let file = ckpt.file.clone();
    if !medfl_shared::lora::bare_file_name(&ckpt.file) {
        return Err(CheckpointError::Missing {
            file,
            folder: folder.display().to_string(),
        });
    }
    let path: PathBuf = folder.join(&ckpt.file);
    let meta = std::fs::metadata(&path).map_err(|_| CheckpointError::Missing {
        file: file.clone(),
        folder: folder.display().to_string(),
    })?;
    let needed: u64 = layout.iter().map(|t| t.len() * 4).sum();
    if meta.len() > needed + HEADER_SLACK {
        return Err(CheckpointError::Read {
            file,
            why: format!(
                "{} bytes, more than the model's {needed} bytes of tensors and a header",
                meta.len()
            ),
        });
    }
    let bytes = std::fs::read(&path).map_err(|e| CheckpointError::Read {
        file: file.clone(),
        why: e.to_string(),
    })?;
    let got = medfl_shared::hex::to_hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    if !got.eq_ignore_ascii_case(&ckpt.sha256) {
        return Err(CheckpointError::HashMismatch {
            file,
            want: ckpt.sha256.to_ascii_lowercase(),
            got,
        });
    }
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::NotSafetensors {
        file: file.clone(),
        why: e.to_string(),
    })?;
    let held: HashMap<String, safetensors::tensor::TensorView<'_>> = tensors.tensors().into_iter().collect();
    let mut names: Vec<&str> = held.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut out = Vec::with_capacity((needed / 4) as usize);
    for t in layout {
        let Some(view) = held.get(&t.name) else {
            return Err(CheckpointError::MissingTensor {
                file,
                name: t.name.clone(),
                shape: t.shape.clone(),
                holds: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        };
        let has: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        if has != t.shape {
            return Err(CheckpointError::Shape {
                file,
                name: t.name.clone(),
                has,
                needs: t.shape.clone(),
            });
        }
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Dtype {
                file,
                name: t.name.clone(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        out.extend(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    let extra: Vec<&str> = names
        .into_iter()
        .filter(|n| !layout.iter().any(|t| t.name == *n))
        .collect();
    if !extra.is_empty() {
        return Err(CheckpointError::Extra {
            file,
            names: extra.join(", "),
        });
    }
    Ok(out)
}

/// Writes `values` laid out as `layout` to a safetensors file (F32, row-major), with
/// `metadata` in its header; returns the file's SHA-256 (hex) for a manifest's
/// `model.init.sha256`.
pub fn write(
    path: &Path,
    layout: &[TensorSpec],
    values: &[f32],
    metadata: HashMap<String, String>,
) -> anyhow::Result<String> {
    use anyhow::{Context, bail};
    let total: u64 = layout.iter().map(TensorSpec::len).sum();
    if total != values.len() as u64 {
        bail!("the layout describes {total} values, {} were given", values.len());
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(layout.len());
    let mut at = 0usize;
    for t in layout {
        let len = t.len() as usize * 4;
        let view = safetensors::tensor::TensorView::new(
            Dtype::F32,
            t.shape.iter().map(|&d| d as usize).collect(),
            &bytes[at..at + len],
        )?;
        views.push((t.name.clone(), view));
        at += len;
    }
    let file = safetensors::tensor::serialize(views, Some(metadata))?;
    std::fs::write(path, &file).with_context(|| format!("write {}", path.display()))?;
    Ok(medfl_shared::hex::to_hex(
        ring::digest::digest(&ring::digest::SHA256, &file).as_ref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<TensorSpec> {
        vec![
            TensorSpec {
                name: "fc0.weight".into(),
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "fc0.bias".into(),
                shape: vec![2],
            },
        ]
    }

    fn saved(dir: &Path, layout: &[TensorSpec], name: &str) -> Checkpoint {
        let n = layout.iter().map(TensorSpec::len).sum::<u64>() as usize;
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let sha256 = write(&dir.join(name), layout, &values, HashMap::new()).expect("written");
        Checkpoint {
            file: name.into(),
            sha256,
        }
    }

    #[test]
    fn a_checkpoint_round_trips_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let ckpt = saved(dir.path(), &layout(), "m.safetensors");
        let values = load(dir.path(), &ckpt, &layout()).expect("loaded");
        assert_eq!(values, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
    }

    #[test]
    fn every_bad_checkpoint_is_refused_with_what_to_fix() {
        let dir = tempfile::tempdir().expect("dir");
        let ckpt = saved(dir.path(), &layout(), "m.safetensors");
        // A hash that does not match.
        let other = Checkpoint {
            sha256: "0".repeat(64),
            ..ckpt.clone()
        };
        let err = load(dir.path(), &other, &layout()).expect_err("hash");
        assert!(matches!(err, CheckpointError::HashMismatch { .. }), "{err}");
        // Not there, or outside the folder.
        for file in ["absent.safetensors", "../m.safetensors"] {
            let c = Checkpoint {
                file: file.into(),
                ..ckpt.clone()
            };
            assert!(matches!(
                load(dir.path(), &c, &layout()),
                Err(CheckpointError::Missing { .. })
            ));
        }
        // A layout whose tensor has another shape, and one the checkpoint lacks.
        let mut wider = layout();
        wider[1].shape = vec![3];
        let err = load(dir.path(), &ckpt, &wider).expect_err("shape").to_string();
        assert!(err.contains("fc0.bias is [2], the model needs [3]"), "{err}");
        let mut renamed = layout();
        renamed[0].name = "fc9.weight".into();
        let err = load(dir.path(), &ckpt, &renamed).expect_err("name").to_string();
        assert!(
            err.contains("no tensor fc9.weight [2, 3]") && err.contains("holds fc0.bias, fc0.weight"),
            "{err}"
        );
        // A tensor the model has no place for.
        let err = load(dir.path(), &ckpt, &layout()[..1]).expect_err("extra").to_string();
        assert!(err.contains("no place for: fc0.bias"), "{err}");
        // Not safetensors (with its right hash), and truncated.
        let text = b"this is a pickle, honest";
        std::fs::write(dir.path().join("p.pt"), text).expect("write");
        let c = Checkpoint {
            file: "p.pt".into(),
            sha256: medfl_shared::hex::to_hex(ring::digest::digest(&ring::digest::SHA256, text).as_ref()),
        };
        assert!(matches!(
            load(dir.path(), &c, &layout()),
            Err(CheckpointError::NotSafetensors { .. })
        ));
        let full = std::fs::read(dir.path().join("m.safetensors")).expect("read");
        let cut = &full[..full.len() - 6];
        std::fs::write(dir.path().join("cut.safetensors"), cut).expect("write");
        let c = Checkpoint {
            file: "cut.safetensors".into(),
            sha256: medfl_shared::hex::to_hex(ring::digest::digest(&ring::digest::SHA256, cut).as_ref()),
        };
        let err = load(dir.path(), &c, &layout()).expect_err("truncated");
        assert!(matches!(err, CheckpointError::NotSafetensors { .. }), "{err}");
    }
}
