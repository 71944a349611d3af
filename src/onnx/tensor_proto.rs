//! Conversion between ONNX `TensorProto` and mtpack's host [`Tensor`]. Reads raw_data and
//! every typed field; sizes are checked against the data actually present before anything
//! is allocated, so a hostile `dims` cannot make mtpack allocate gigabytes.

use ndarray::{ArrayD, IxDyn};

use super::pb::tensor_proto::{DataLocation, DataType};
use super::pb::TensorProto;
use super::OnnxError;
use crate::tensor::{element_count, DType, Tensor};

fn bad(t: &TensorProto, problem: impl Into<String>) -> OnnxError {
    OnnxError::Tensor { tensor: t.name().to_string(), problem: problem.into() }
}

/// The mtpack element type of an ONNX data type code, if supported.
pub fn dtype_of(code: i32) -> Option<DType> {
    match DataType::try_from(code).ok()? {
        DataType::Float => Some(DType::F32),
        DataType::Double => Some(DType::F64),
        DataType::Int64 => Some(DType::I64),
        DataType::Int32 => Some(DType::I32),
        DataType::Int8 => Some(DType::I8),
        DataType::Uint8 => Some(DType::U8),
        DataType::Bool => Some(DType::Bool),
        _ => None,
    }
}

pub fn onnx_code(dtype: DType) -> i32 {
    (match dtype {
        DType::F32 => DataType::Float,
        DType::F64 => DataType::Double,
        DType::I64 => DataType::Int64,
        DType::I32 => DataType::Int32,
        DType::I8 => DataType::Int8,
        DType::U8 => DataType::Uint8,
        DType::Bool => DataType::Bool,
    }) as i32
}

/// Name of an ONNX data type code for messages ("FLOAT16", "code 99").
pub fn data_type_name(code: i32) -> String {
    DataType::try_from(code).map(|d| d.as_str_name().to_string()).unwrap_or_else(|_| format!("code {code}"))
}

pub fn shape_of(t: &TensorProto) -> Result<Vec<usize>, OnnxError> {
    t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| bad(t, format!("negative dimension {d}")))).collect()
}

/// Number of elements the tensor declares, with overflow reported as an error.
pub fn declared_len(t: &TensorProto) -> Result<usize, OnnxError> {
    let shape = shape_of(t)?;
    element_count(&shape).ok_or_else(|| bad(t, format!("dimensions {:?} overflow", t.dims)))
}

/// Reads a tensor's values. External data must have been resolved by the loader first.
pub fn to_tensor(t: &TensorProto) -> Result<Tensor, OnnxError> {
    if t.data_location() == DataLocation::External {
        return Err(bad(t, "external data was not loaded (load the model from its file)"));
    }
    let code = t.data_type();
    let dtype =
        dtype_of(code).ok_or_else(|| bad(t, format!("element type {} is not supported", data_type_name(code))))?;
    let shape = shape_of(t)?;
    let count = declared_len(t)?;
    if let Some(raw) = t.raw_data.as_deref().filter(|r| !r.is_empty() || count == 0) {
        return Tensor::from_le_bytes(dtype, &shape, raw).map_err(|p| bad(t, p));
    }
    let wrong = |have: usize| bad(t, format!("holds {have} values but its dimensions {:?} need {count}", t.dims));
    let arr = |n: usize| if n == count { Ok(()) } else { Err(wrong(n)) };
    let dim = IxDyn(&shape);
    let shaped = |e: ndarray::ShapeError| bad(t, e.to_string());
    Ok(match dtype {
        DType::F32 => {
            arr(t.float_data.len())?;
            Tensor::F32(ArrayD::from_shape_vec(dim, t.float_data.clone()).map_err(shaped)?)
        }
        DType::F64 => {
            arr(t.double_data.len())?;
            Tensor::F64(ArrayD::from_shape_vec(dim, t.double_data.clone()).map_err(shaped)?)
        }
        DType::I64 => {
            arr(t.int64_data.len())?;
            Tensor::I64(ArrayD::from_shape_vec(dim, t.int64_data.clone()).map_err(shaped)?)
        }
        DType::I32 => {
            arr(t.int32_data.len())?;
            Tensor::I32(ArrayD::from_shape_vec(dim, t.int32_data.clone()).map_err(shaped)?)
        }
        // Narrow integer types are stored widened in int32_data.
        DType::I8 => {
            arr(t.int32_data.len())?;
            let v = t.int32_data.iter().map(|&x| x as i8).collect();
            Tensor::I8(ArrayD::from_shape_vec(dim, v).map_err(shaped)?)
        }
        DType::U8 => {
            arr(t.int32_data.len())?;
            let v = t.int32_data.iter().map(|&x| x as u8).collect();
            Tensor::U8(ArrayD::from_shape_vec(dim, v).map_err(shaped)?)
        }
        DType::Bool => {
            arr(t.int32_data.len())?;
            let v = t.int32_data.iter().map(|&x| x != 0).collect();
            Tensor::Bool(ArrayD::from_shape_vec(dim, v).map_err(shaped)?)
        }
    })
}

/// Encodes a host tensor as an ONNX initializer (raw_data, the compact form).
pub fn from_tensor(name: &str, t: &Tensor) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(onnx_code(t.dtype())),
        raw_data: Some(t.to_le_bytes()),
        ..Default::default()
    }
}

/// Replaces `t`'s value with `value`, keeping its name and its doc string (where exporters
/// and mtpack record what a weight is).
pub fn refill(t: &mut TensorProto, value: &Tensor) {
    let mut fresh = from_tensor(t.name(), value);
    fresh.doc_string = t.doc_string.take();
    *t = fresh;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dims: Vec<i64>, code: DataType) -> TensorProto {
        TensorProto { name: Some("w".into()), dims, data_type: Some(code as i32), ..Default::default() }
    }

    #[test]
    fn raw_and_typed_fields_read_the_same_values() {
        let mut typed = proto(vec![2, 2], DataType::Float);
        typed.float_data = vec![1.0, 2.0, 3.0, 4.0];
        let t = to_tensor(&typed).unwrap();
        let raw = from_tensor("w", &t);
        assert_eq!(to_tensor(&raw).unwrap(), t);
    }

    #[test]
    fn int8_in_int32_data() {
        let mut p = proto(vec![3], DataType::Int8);
        p.int32_data = vec![-1, 5, 127];
        let t = to_tensor(&p).unwrap();
        assert_eq!(t.to_f64_vec(), vec![-1.0, 5.0, 127.0]);
    }

    #[test]
    fn hostile_dims_are_refused_without_allocating() {
        let mut p = proto(vec![1 << 40, 1 << 40], DataType::Float);
        p.raw_data = Some(vec![0; 8]);
        let e = to_tensor(&p).unwrap_err().to_string();
        assert!(e.contains("tensor 'w'"), "{e}");
        let mut p = proto(vec![1 << 30], DataType::Float);
        p.float_data = vec![0.0; 3];
        let e = to_tensor(&p).unwrap_err().to_string();
        assert!(e.contains("holds 3 values"), "{e}");
    }

    #[test]
    fn negative_dims_and_unsupported_types() {
        let p = proto(vec![-1], DataType::Float);
        assert!(to_tensor(&p).unwrap_err().to_string().contains("negative dimension"));
        let p = proto(vec![1], DataType::Complex128);
        assert!(to_tensor(&p).unwrap_err().to_string().contains("COMPLEX128"));
    }
}
