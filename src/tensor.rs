//! A host tensor: the one array type that crosses every boundary in mtpack (ONNX
//! initializers, ONNX Runtime and tract values, datasets, checkpoints).

use ndarray::{ArrayD, IxDyn};

/// Element types mtpack reads and writes. ONNX has more; those are refused with a clear error
/// where they would have to be materialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An owned n-dimensional array of one of the supported element types.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

macro_rules! each {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::F64($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

impl Tensor {
    /// A tensor of zeros (false) of `dtype` and `shape`.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let s = ndarray::IxDyn(shape);
        match dtype {
            DType::F32 => Tensor::F32(ArrayD::zeros(s)),
            DType::F64 => Tensor::F64(ArrayD::zeros(s)),
            DType::I64 => Tensor::I64(ArrayD::zeros(s)),
            DType::I32 => Tensor::I32(ArrayD::zeros(s)),
            DType::I8 => Tensor::I8(ArrayD::zeros(s)),
            DType::U8 => Tensor::U8(ArrayD::zeros(s)),
            DType::Bool => Tensor::Bool(ArrayD::from_elem(s, false)),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::F64(_) => DType::F64,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        each!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        each!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The given rows (indices along the first axis); an error for a scalar or a row out
    /// of range.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Tensor, String> {
        let n = self.shape().first().copied().ok_or("a scalar has no rows")?;
        if let Some(bad) = rows.iter().find(|&&r| r >= n) {
            return Err(format!("row {bad} of {n}"));
        }
        Ok(match self {
            Tensor::F32(a) => Tensor::F32(a.select(ndarray::Axis(0), rows)),
            Tensor::F64(a) => Tensor::F64(a.select(ndarray::Axis(0), rows)),
            Tensor::I64(a) => Tensor::I64(a.select(ndarray::Axis(0), rows)),
            Tensor::I32(a) => Tensor::I32(a.select(ndarray::Axis(0), rows)),
            Tensor::I8(a) => Tensor::I8(a.select(ndarray::Axis(0), rows)),
            Tensor::U8(a) => Tensor::U8(a.select(ndarray::Axis(0), rows)),
            Tensor::Bool(a) => Tensor::Bool(a.select(ndarray::Axis(0), rows)),
        })
    }

    /// Tensors of one type and trailing shape stacked along their first axis.
    pub fn concat_rows(parts: &[&Tensor]) -> Result<Tensor, String> {
        fn join<T: Clone>(arrays: Vec<&ArrayD<T>>) -> Result<ArrayD<T>, String> {
            let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).map_err(|e| e.to_string())
        }
        macro_rules! all {
            ($variant:ident) => {
                parts
                    .iter()
                    .map(|t| match t {
                        Tensor::$variant(a) => Ok(a),
                        other => Err(format!("{} among {} parts", other.dtype().name(), stringify!($variant))),
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .and_then(join)
                    .map(Tensor::$variant)
            };
        }
        match parts.first() {
            None => Err("nothing to stack".into()),
            Some(Tensor::F32(_)) => all!(F32),
            Some(Tensor::F64(_)) => all!(F64),
            Some(Tensor::I64(_)) => all!(I64),
            Some(Tensor::I32(_)) => all!(I32),
            Some(Tensor::I8(_)) => all!(I8),
            Some(Tensor::U8(_)) => all!(U8),
            Some(Tensor::Bool(_)) => all!(Bool),
        }
    }

    /// The values as f64, for comparisons and statistics across element types.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Tensor::F32(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::F64(a) => a.iter().copied().collect(),
            Tensor::I64(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::I32(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::I8(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::U8(a) => a.iter().map(|&v| v as f64).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// Little-endian bytes in row-major order (the layout of ONNX raw_data and safetensors).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn collect<T: Copy, const N: usize>(a: &ArrayD<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(a.len() * N);
            for &v in a.iter() {
                out.extend_from_slice(&f(v));
            }
            out
        }
        match self {
            Tensor::F32(a) => collect(a, f32::to_le_bytes),
            Tensor::F64(a) => collect(a, f64::to_le_bytes),
            Tensor::I64(a) => collect(a, i64::to_le_bytes),
            Tensor::I32(a) => collect(a, i32::to_le_bytes),
            Tensor::I8(a) => collect(a, i8::to_le_bytes),
            Tensor::U8(a) => a.iter().copied().collect(),
            Tensor::Bool(a) => a.iter().map(|&b| b as u8).collect(),
        }
    }

    /// Builds a tensor from little-endian bytes. The caller has checked that
    /// `bytes.len() == product(shape) * dtype.size()`; a mismatch is reported, not a panic.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
        let count = element_count(shape).ok_or_else(|| format!("shape {shape:?} overflows"))?;
        let expected = count.checked_mul(dtype.size()).ok_or_else(|| format!("shape {shape:?} overflows"))?;
        if bytes.len() != expected {
            return Err(format!("{} bytes for {dtype} {shape:?}, expected {expected}", bytes.len()));
        }
        fn build<T, const N: usize>(
            shape: &[usize],
            bytes: &[u8],
            f: impl Fn([u8; N]) -> T,
        ) -> Result<ArrayD<T>, String> {
            let data: Vec<T> = bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut b = [0u8; N];
                    b.copy_from_slice(c);
                    f(b)
                })
                .collect();
            ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| e.to_string())
        }
        Ok(match dtype {
            DType::F32 => Tensor::F32(build(shape, bytes, f32::from_le_bytes)?),
            DType::F64 => Tensor::F64(build(shape, bytes, f64::from_le_bytes)?),
            DType::I64 => Tensor::I64(build(shape, bytes, i64::from_le_bytes)?),
            DType::I32 => Tensor::I32(build(shape, bytes, i32::from_le_bytes)?),
            DType::I8 => Tensor::I8(build(shape, bytes, i8::from_le_bytes)?),
            DType::U8 => Tensor::U8(build(shape, bytes, |[b]: [u8; 1]| b)?),
            DType::Bool => Tensor::Bool(build(shape, bytes, |[b]: [u8; 1]| b != 0)?),
        })
    }

    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            Tensor::I64(a) => Some(a),
            _ => None,
        }
    }
}

/// Product of dimensions, or None on overflow: sizes come from files and may be hostile.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Largest absolute difference between two tensors of the same shape, read as f64.
/// NaN in either side counts as an infinite difference so that it never passes a tolerance.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Option<f64> {
    if a.shape() != b.shape() {
        return None;
    }
    let (x, y) = (a.to_f64_vec(), b.to_f64_vec());
    Some(x.iter().zip(&y).fold(0.0f64, |m, (p, q)| {
        let d = (p - q).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_stack_in_order_and_types_do_not_mix() {
        let a = Tensor::I64(ndarray::arr2(&[[1i64, 2]]).into_dyn());
        let b = Tensor::I64(ndarray::arr2(&[[3i64, 4], [5, 6]]).into_dyn());
        let s = Tensor::concat_rows(&[&a, &b]).unwrap();
        assert_eq!(s.shape(), [3, 2]);
        assert_eq!(s.to_f64_vec(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let f = Tensor::zeros(DType::F32, &[1, 2]);
        assert!(Tensor::concat_rows(&[&a, &f]).unwrap_err().contains("float32"));
        assert!(Tensor::concat_rows(&[]).is_err());
    }

    #[test]
    fn bytes_round_trip_every_dtype() {
        let shape = [2usize, 3];
        for t in [
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&shape), vec![1.5, -2.0, 0.0, 3.25, 4.0, -0.5]).unwrap()),
            Tensor::I64(ArrayD::from_shape_vec(IxDyn(&shape), vec![1, -2, 3, i64::MAX, 0, -7]).unwrap()),
            Tensor::U8(ArrayD::from_shape_vec(IxDyn(&shape), vec![0, 1, 2, 255, 4, 5]).unwrap()),
            Tensor::Bool(ArrayD::from_shape_vec(IxDyn(&shape), vec![true, false, true, true, false, false]).unwrap()),
        ] {
            let back = Tensor::from_le_bytes(t.dtype(), &shape, &t.to_le_bytes()).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn wrong_byte_count_is_an_error() {
        let err = Tensor::from_le_bytes(DType::F32, &[2, 2], &[0u8; 15]).unwrap_err();
        assert!(err.contains("expected 16"), "{err}");
    }

    #[test]
    fn hostile_shape_overflows_cleanly() {
        assert!(element_count(&[usize::MAX, 2]).is_none());
        assert!(Tensor::from_le_bytes(DType::F32, &[usize::MAX, 4], &[]).is_err());
    }

    #[test]
    fn nan_never_passes_a_tolerance() {
        let a = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, f32::NAN]).unwrap());
        let b = Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, 1.0]).unwrap());
        assert_eq!(max_abs_diff(&a, &b), Some(f64::INFINITY));
    }
}
