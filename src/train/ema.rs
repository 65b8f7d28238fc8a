//! EMA of the target encoder (METHOD.md §4): after every optimiser step
//! `t = m*t + (1-m)*s` over all encoder parameters, as in the official `train.py`
//! (`param_k.mul_(m).add_((1-m) * param_q)`). `Var::set` refuses a value that shares storage with
//! the variable, so the new value is built as a fresh tensor and copied in; f32 CPU parameters
//! are instead updated in place in one pass (`fused_update`, same arithmetic) while the fused
//! kernels are on.

use candle_core::Var;

use super::fused_update;

/// Errors of the EMA update.
#[derive(Debug, thiserror::Error)]
pub enum EmaError {
    /// The momentum is outside [0, 1].
    #[error("EMA momentum {0} outside [0, 1]")]
    Momentum(f64),
    /// A target/online pair with different shapes.
    #[error("EMA pair {index}: target shape {target:?} vs online shape {online:?}")]
    Shape {
        index: usize,
        target: Vec<usize>,
        online: Vec<usize>,
    },
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `target = m*target + (1-m)*online` for every `(target, online)` pair, in place.
pub fn ema_update(pairs: &[(Var, Var)], momentum: f64) -> Result<(), EmaError> {
    if !(0.0..=1.0).contains(&momentum) {
        return Err(EmaError::Momentum(momentum));
    }
    for (i, (t, s)) in pairs.iter().enumerate() {
        if t.dims() != s.dims() {
            return Err(EmaError::Shape {
                index: i,
                target: t.dims().to_vec(),
                online: s.dims().to_vec(),
            });
        }
        let ts = [t.as_tensor(), s.as_tensor()];
        if fused_update::applies(&ts) || fused_update::applies_cuda(&ts) {
            fused_update::ema_inplace(t.as_tensor(), s.as_tensor(), momentum)?;
            continue;
        }
        let new = (t.as_detached_tensor().affine(momentum, 0.0)?
            + s.as_detached_tensor().affine(1.0 - momentum, 0.0)?)?;
        t.set(&new)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn moves_towards_online() {
        let dev = Device::Cpu;
        let t = Var::new(&[1f32, 2.], &dev).unwrap();
        let s = Var::new(&[3f32, 2.], &dev).unwrap();
        ema_update(&[(t.clone(), s)], 0.75).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![1.5, 2.0]);
        assert!(ema_update(&[], 1.5).is_err());
    }
}
