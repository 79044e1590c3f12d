//! Which compute device runs the model (docs/backends.md explains the choice).
//!
//! The default is burn's `flex` CPU backend, the fastest of burn's CPU backends on our machines.
//! With the `cuda` feature, `RLHF_DEVICE=cuda[:N]` (or [`Backend::Cuda`]) selects a GPU.

use burn::tensor::Device;

use crate::error::{ModelError, Result};

/// A compute backend choice, parsed from `RLHF_DEVICE` or a command-line flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// burn's pure-Rust CPU backend (default).
    Flex,
    /// burn's deprecated ndarray backend; only built with the `ndarray` feature, for benchmarks.
    NdArray,
    /// burn-cuda device N; only built with the `cuda` feature.
    Cuda(usize),
}

impl Backend {
    /// Parses `flex`, `ndarray`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "cpu" | "flex" => Ok(Backend::Flex),
            "ndarray" => Ok(Backend::NdArray),
            "cuda" => Ok(Backend::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Backend::Cuda(n)),
                _ => Err(ModelError::InvalidInput(format!(
                    "unknown device `{s}` (expected flex, ndarray, cuda or cuda:N)"
                ))),
            },
        }
    }

    /// `RLHF_DEVICE`, or flex when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("RLHF_DEVICE") {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(Backend::Flex),
        }
    }

    /// The inference device of this backend.
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Backend::NdArray => Ok(Device::ndarray()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(n) => Ok(Device::cuda(n)),
            #[allow(unreachable_patterns)]
            other => Err(ModelError::InvalidInput(format!(
                "device {other:?} is not compiled in: rebuild with the matching cargo feature"
            ))),
        }
    }
}

/// The inference device: `RLHF_DEVICE`, or the flex CPU backend.
pub fn inference_device() -> Result<Device> {
    Backend::from_env()?.device()
}

/// The same device with gradient tracking, for training.
pub fn training_device() -> Result<Device> {
    Ok(inference_device()?.autodiff())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!(Backend::parse("flex").unwrap(), Backend::Flex);
        assert_eq!(Backend::parse("cuda:3").unwrap(), Backend::Cuda(3));
        assert!(
            Backend::parse("tpu")
                .unwrap_err()
                .to_string()
                .contains("tpu")
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = Backend::Cuda(0).device().unwrap_err().to_string();
        assert!(err.contains("cargo feature"), "{err}");
    }
}
