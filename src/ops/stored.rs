//! The forward of an op whose output was computed before the op was recorded (the chunked and
//! fused attention, a checkpointed block): the node takes that tensor once, so only the node's
//! own copy stays alive afterwards (backward passes read it as `res`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Shape, Storage, Tensor};
use std::sync::Mutex;

pub(crate) struct Stored {
    out: Mutex<Option<Tensor>>,
    /// The op's name, for errors.
    name: &'static str,
}

impl Stored {
    pub(crate) fn new(out: Tensor, name: &'static str) -> Self {
        Self {
            out: Mutex::new(Some(out)),
            name,
        }
    }

    fn take<S: BackendStorage>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let err = |what: &str| candle_core::Error::Msg(format!("{}: {what}", self.name));
        let out = self
            .out
            .lock()
            .map_err(|_| err("poisoned"))?
            .take()
            .ok_or_else(|| err("forward ran twice"))?;
        let (storage, layout) = out.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| err("output on another device than the inputs"))?;
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    /// The output's storage for `cpu_fwd`.
    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    /// The output's storage for `cuda_fwd`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }
}
