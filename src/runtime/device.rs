//! Where computations run. CPU by default; CUDA only when asked for, and asking for it where
//! it is not available is an error rather than a silent CPU run.

use super::RuntimeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
}

/// The candle device for training. CUDA needs mtpack built with `--features cuda-train`
/// (which needs the CUDA toolkit at build time) and a working GPU.
pub fn candle_device(choice: DeviceChoice) -> Result<candle_core::Device, RuntimeError> {
    match choice {
        DeviceChoice::Cpu => Ok(candle_core::Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
    }
}

#[cfg(feature = "cuda-train")]
fn cuda_device() -> Result<candle_core::Device, RuntimeError> {
    // cudarc loads these when first called and panics when one is missing; ask first. Safety:
    // each only tries to open the library by its names.
    let present = unsafe {
        [
            (
                "the CUDA driver (libcuda.so.1; is there an NVIDIA GPU and its driver?)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("cuBLAS (libcublas.so.13)", cudarc::cublas::sys::is_culib_present()),
            ("cuBLASLt (libcublasLt.so.13)", cudarc::cublaslt::sys::is_culib_present()),
            ("cuRAND (libcurand.so.10)", cudarc::curand::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = present.iter().filter(|(_, here)| !here).map(|(what, _)| *what).collect();
    if !missing.is_empty() {
        return Err(RuntimeError::Device {
            device: "cuda".into(),
            why: format!(
                "cannot load {}: put the CUDA 13 libraries on LD_LIBRARY_PATH (PyTorch's CUDA wheels hold them under site-packages/nvidia)",
                missing.join(", ")
            ),
        });
    }
    candle_core::Device::new_cuda(0).map_err(|e| RuntimeError::Device { device: "cuda".into(), why: e.to_string() })
}

#[cfg(not(feature = "cuda-train"))]
fn cuda_device() -> Result<candle_core::Device, RuntimeError> {
    Err(RuntimeError::Device {
        device: "cuda".into(),
        why: "this mtpack was built without the `cuda-train` feature (cargo build --features cuda-train, needs the CUDA toolkit)".into(),
    })
}

/// ONNX Runtime execution providers for a device: CUDA is registered with
/// `error_on_failure`, so a library without the CUDA provider (the CPU wheel) or a machine
/// without a GPU fails loudly.
pub fn ort_providers(choice: DeviceChoice) -> Result<Vec<ort::ep::ExecutionProviderDispatch>, RuntimeError> {
    match choice {
        DeviceChoice::Cpu => Ok(Vec::new()),
        DeviceChoice::Cuda => cuda_providers(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_providers() -> Result<Vec<ort::ep::ExecutionProviderDispatch>, RuntimeError> {
    Ok(vec![ort::ep::CUDA::default().build().error_on_failure()])
}

#[cfg(not(feature = "cuda"))]
fn cuda_providers() -> Result<Vec<ort::ep::ExecutionProviderDispatch>, RuntimeError> {
    Err(RuntimeError::Device {
        device: "cuda".into(),
        why: "this mtpack was built without the `cuda` feature (cargo build --features cuda)".into(),
    })
}

// A CUDA training build has neither error to test (the GPU's own checks are
// scripts/gpu-check.sh's).
#[cfg(all(test, not(feature = "cuda-train")))]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_an_error() {
        let Err(e) = ort_providers(DeviceChoice::Cuda) else { panic!("cuda providers without the feature") };
        let e = e.to_string();
        assert!(e.contains("device 'cuda' is not available"), "{e}");
    }

    #[cfg(not(feature = "cuda-train"))]
    #[test]
    fn cuda_training_without_the_feature_is_an_error() {
        assert!(candle_device(DeviceChoice::Cuda).is_err());
        assert!(candle_device(DeviceChoice::Cpu).is_ok());
    }
}
