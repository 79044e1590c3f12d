//! Copying tensors to the host.

use burn::tensor::Tensor;

/// The values of a float tensor as f32, row-major.
pub fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 just above")
}
