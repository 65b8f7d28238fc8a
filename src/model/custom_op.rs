//! One shape for candle's custom ops. candle asks a `CustomOp1/2/3` for a forward per device, each
//! with its storages and layouts spelled out one argument at a time, and a backward with the
//! tensors the same way; every op of `model::fused`, `model::cuda_ops`, `model::gather` and the
//! NCCL all-reduce wrote those signatures again. An op here implements [`Op<N>`] once, whatever
//! its arity `N`: its arguments come as arrays, and [`Custom`] turns it into the candle op of
//! that arity. [`apply`] / [`apply_no_bwd`] run one on tensors.
//!
//! The CUDA forward of an op is optional (candle's own "no cuda implementation" error when it is
//! missing); it is written under `#[cfg(feature = "cuda")]`, the adapter is not.

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Error, Layout, Result, Shape, Tensor,
};

/// One argument of a CPU forward: its storage and layout.
pub type CpuArg<'a> = (&'a CpuStorage, &'a Layout);
/// One argument of a CUDA forward: its storage and layout.
pub type CudaArg<'a> = (&'a CudaStorage, &'a Layout);
/// What a CPU forward returns: the output storage and its shape.
pub type CpuOut = Result<(CpuStorage, Shape)>;
/// What a CUDA forward returns: the output storage and its shape.
pub type CudaOut = Result<(CudaStorage, Shape)>;
/// The gradients of the `N` arguments (`None`: no gradient for that one).
pub type Grads<const N: usize> = Result<[Option<Tensor>; N]>;

/// A custom op of `N` tensor arguments.
pub trait Op<const N: usize> {
    /// The op's name in candle's errors.
    const NAME: &'static str;

    /// The forward on the CPU.
    fn cpu(&self, args: [CpuArg<'_>; N]) -> CpuOut;

    /// The forward on CUDA (default: none).
    fn cuda(&self, _args: [CudaArg<'_>; N]) -> CudaOut {
        Err(Error::Cuda(
            format!("no cuda implementation for {}", Self::NAME).into(),
        ))
    }

    /// The gradients of the arguments from the forward's arguments, its result and the result's
    /// gradient (default: the op has no backward).
    fn bwd(&self, _args: [&Tensor; N], _res: &Tensor, _grad: &Tensor) -> Grads<N> {
        Err(Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// An [`Op`] as the candle op of its arity.
pub struct Custom<T>(pub T);

impl<T: Op<1>> CustomOp1 for Custom<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CpuOut {
        self.0.cpu([(s, l)])
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> CudaOut {
        self.0.cuda([(s, l)])
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [g] = self.0.bwd([x], res, grad)?;
        Ok(g)
    }
}

impl<T: Op<2>> CustomOp2 for Custom<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CpuOut {
        self.0.cpu([(s1, l1), (s2, l2)])
    }
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> CudaOut {
        self.0.cuda([(s1, l1), (s2, l2)])
    }
    fn bwd(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [g1, g2] = self.0.bwd([x1, x2], res, grad)?;
        Ok((g1, g2))
    }
}

type Three<T> = (Option<T>, Option<T>, Option<T>);

impl<T: Op<3>> CustomOp3 for Custom<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    #[rustfmt::skip]
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CpuOut {
        self.0.cpu([(s1, l1), (s2, l2), (s3, l3)])
    }
    #[rustfmt::skip]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> CudaOut {
        self.0.cuda([(s1, l1), (s2, l2), (s3, l3)])
    }
    #[rustfmt::skip]
    fn bwd(&self, x1: &Tensor, x2: &Tensor, x3: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Three<Tensor>> {
        let [g1, g2, g3] = self.0.bwd([x1, x2, x3], res, grad)?;
        Ok((g1, g2, g3))
    }
}

/// Runs `op` on `args` with its backward recorded.
pub fn apply<const N: usize, T>(args: [&Tensor; N], op: T) -> Result<Tensor>
where
    T: Op<N> + Send + Sync + 'static,
    Custom<T>: Applies<N>,
{
    Custom(op).apply_to(args, true)
}

/// Runs `op` on `args` without a backward.
pub fn apply_no_bwd<const N: usize, T>(args: [&Tensor; N], op: T) -> Result<Tensor>
where
    T: Op<N> + Send + Sync + 'static,
    Custom<T>: Applies<N>,
{
    Custom(op).apply_to(args, false)
}

/// The candle entry point of an op of arity `N`.
pub trait Applies<const N: usize> {
    /// Runs the op on `args`, recording its backward when `bwd`.
    fn apply_to(self, args: [&Tensor; N], bwd: bool) -> Result<Tensor>;
}

impl<T: Op<1> + Send + Sync + 'static> Applies<1> for Custom<T> {
    fn apply_to(self, [x]: [&Tensor; 1], bwd: bool) -> Result<Tensor> {
        match bwd {
            true => x.apply_op1(self),
            false => x.apply_op1_no_bwd(&self),
        }
    }
}

impl<T: Op<2> + Send + Sync + 'static> Applies<2> for Custom<T> {
    fn apply_to(self, [x, y]: [&Tensor; 2], bwd: bool) -> Result<Tensor> {
        match bwd {
            true => x.apply_op2(y, self),
            false => x.apply_op2_no_bwd(y, &self),
        }
    }
}

impl<T: Op<3> + Send + Sync + 'static> Applies<3> for Custom<T> {
    fn apply_to(self, [x, y, z]: [&Tensor; 3], bwd: bool) -> Result<Tensor> {
        match bwd {
            true => x.apply_op3(y, z, self),
            false => x.apply_op3_no_bwd(y, z, &self),
        }
    }
}

/// The contiguous f32 data of a CPU argument; `op` names the op in the error.
pub fn f32_data<'a>((s, l): (&'a CpuStorage, &Layout), op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: expected an f32 tensor")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `x * k` with its backward, an op of one argument.
    struct Scale(f32);

    impl Op<1> for Scale {
        const NAME: &'static str = "test-scale";
        fn cpu(&self, [x]: [CpuArg<'_>; 1]) -> CpuOut {
            let y = f32_data(x, Self::NAME)?
                .iter()
                .map(|v| v * self.0)
                .collect();
            Ok((CpuStorage::F32(y), x.1.shape().clone()))
        }
        fn bwd(&self, _: [&Tensor; 1], _: &Tensor, grad: &Tensor) -> Grads<1> {
            Ok([Some((grad * self.0 as f64)?)])
        }
    }

    /// `a - b + c`, an op of three arguments with no backward.
    struct Mix;

    impl Op<3> for Mix {
        const NAME: &'static str = "test-mix";
        fn cpu(&self, [a, b, c]: [CpuArg<'_>; 3]) -> CpuOut {
            let (a, b, c) = (f32_data(a, "a")?, f32_data(b, "b")?, f32_data(c, "c")?);
            let y = a
                .iter()
                .zip(b)
                .zip(c)
                .map(|((a, b), c)| a - b + c)
                .collect();
            Ok((CpuStorage::F32(y), Shape::from(a.len())))
        }
    }

    #[test]
    fn ops_of_each_arity_run_forward_and_backward() {
        let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let y = apply([x.as_tensor()], Scale(2.0)).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [2.0, -4.0, 6.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), [2.0; 3]);

        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let (a, b, c) = (t(&[1.0, 2.0]), t(&[0.5, 0.5]), t(&[10.0, 20.0]));
        let m = apply_no_bwd([&a, &b, &c], Mix).unwrap();
        assert_eq!(m.to_vec1::<f32>().unwrap(), [10.5, 21.5]);
    }

    #[test]
    fn missing_parts_say_which_op() {
        let x = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let (a, b) = (
            x.as_tensor(),
            Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap(),
        );
        let m = apply([a, &b, &b], Mix).unwrap();
        let err = m.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("test-mix"), "{err}");
        let strided = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        let err = apply([&strided], Scale(1.0)).unwrap_err().to_string();
        assert!(
            err.contains("test-scale: the input must be contiguous"),
            "{err}"
        );
    }
}
