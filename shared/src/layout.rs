//! A model's layout: the named tensors (f32, row-major, in order) of the flat parameter
//! vector that travels, is aggregated and is stored.

use serde::{Deserialize, Serialize};

/// One named tensor of a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn len(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
