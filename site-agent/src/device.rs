//! Where the built-in conv-net trainer computes: the CPU (the default and the CI path),
//! or a CUDA GPU (`device = "cuda:N"` in agent.toml) in a build with the `cuda` feature
//! (candle's CUDA backend; it needs the CUDA toolkit to build). Logistic regression and
//! MLPs, whose vectorized per-example gradients are small matrix products, stay on the
//! CPU.

use std::sync::OnceLock;

/// A compute device as agent.toml names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// A CUDA GPU by its ordinal.
    Cuda(usize),
}

impl ComputeDevice {
    /// Reads `"cpu"` or `"cuda:N"` (`"cuda"` is `"cuda:0"`); a CUDA device in a build
    /// without the `cuda` feature is refused with what to do.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("cpu") {
            return Ok(ComputeDevice::Cpu);
        }
        let ordinal = match text.strip_prefix("cuda") {
            Some("") => 0,
            Some(rest) => rest
                .strip_prefix(':')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| format!("device = {text:?}: write \"cpu\" or \"cuda:N\" (N the GPU's ordinal)"))?,
            None => {
                return Err(format!(
                    "device = {text:?}: write \"cpu\" or \"cuda:N\" (N the GPU's ordinal)"
                ));
            }
        };
        if !cfg!(feature = "cuda") {
            return Err(format!(
                "device = {text:?}: this medfl-agent was built without the `cuda` feature; build it with `cargo build --release --features cuda` on a machine with the CUDA toolkit, or set device = \"cpu\""
            ));
        }
        Ok(ComputeDevice::Cuda(ordinal))
    }

    /// The candle device.
    pub fn candle(self) -> candle_core::Result<candle_core::Device> {
        match self {
            ComputeDevice::Cpu => Ok(candle_core::Device::Cpu),
            ComputeDevice::Cuda(ordinal) => candle_core::Device::new_cuda(ordinal),
        }
    }
}

static DEVICE: OnceLock<ComputeDevice> = OnceLock::new();

/// Sets this process's device once, when the agent starts; later calls keep the first.
pub fn select(device: ComputeDevice) {
    let _ = DEVICE.set(device);
}

/// The device the conv-net trainer uses: the one selected, else the CPU.
pub fn current() -> candle_core::Result<candle_core::Device> {
    DEVICE.get().copied().unwrap_or_default().candle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_read_and_cuda_is_refused_without_the_feature() {
        assert_eq!(ComputeDevice::parse("cpu"), Ok(ComputeDevice::Cpu));
        assert!(
            ComputeDevice::parse("tpu")
                .expect_err("unknown")
                .contains("write \"cpu\" or \"cuda:N\"")
        );
        assert!(ComputeDevice::parse("cuda:x").is_err());
        if cfg!(feature = "cuda") {
            assert_eq!(ComputeDevice::parse("cuda:1"), Ok(ComputeDevice::Cuda(1)));
        } else {
            let err = ComputeDevice::parse("cuda:0").expect_err("no cuda feature");
            assert!(err.contains("built without the `cuda` feature"), "{err}");
        }
    }
}
