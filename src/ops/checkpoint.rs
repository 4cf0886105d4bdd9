//! Gradient checkpointing (diffusers' `enable_gradient_checkpointing`, PyTorch's
//! `torch.utils.checkpoint`): a block's forward runs and its autograd graph is dropped at once,
//! keeping only the block's inputs and output; during backward the block runs again, this time
//! with its graph, and the gradient flowing into its output is pushed through that graph.
//!
//! [`checkpoint`] wraps a block `f(a, b)` (a resnet of `(hidden, temb)`, a transformer of
//! `(hidden, context)`) as one graph node. Its backward recomputes `y = f(a, b)` and runs a
//! nested backward of `sum(y * dy)` (in f32), whose gradients are exactly `dy` pushed through
//! the block. The gradients that reach `a` and `b` go back into the outer graph; those of the
//! block's own trainable tensors (LoRA adapters, full-parameter weights) do not belong to the
//! outer graph, so they are collected in a sink that [`backward_with_checkpoints`] opens for the
//! tensors the caller trains. A backward through checkpointed blocks without that sink fails
//! naming the block rather than dropping those gradients.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, TensorId, Var};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::stored::Stored;

/// A checkpointed block: `(a, b) -> y`, deterministic (it runs twice).
pub type Block = Arc<dyn Fn(&Tensor, &Tensor) -> anyhow::Result<Tensor> + Send + Sync>;

thread_local! {
    /// The tensors whose gradients blocks collect during a backward, and what they collected.
    static SINK: RefCell<Option<HashMap<TensorId, Option<Tensor>>>> = const { RefCell::new(None) };
}

/// `f(a, b)` as one graph node whose internals are recomputed during backward (see the module
/// docs). `name` appears in errors.
pub fn checkpoint(
    a: &Tensor,
    b: &Tensor,
    name: &'static str,
    f: Block,
) -> candle_core::Result<Tensor> {
    // the block's graph is built here and dropped with `full` at the end of this function
    let full =
        f(&a.detach(), &b.detach()).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
    // a plain contiguous tensor of its own, so the node can take its storage as it is
    let y = full.detach().contiguous()?;
    let y = if y.storage_and_layout().1.start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    drop(full);
    // a trainable leaf, so the node is recorded even when neither input carries a graph
    let anchor = Var::zeros((), DType::F32, a.device())?;
    a.apply_op3(
        b,
        anchor.as_tensor(),
        CheckpointOp {
            y: Stored::new(y, "sd-lora-checkpoint"),
            name,
            f,
        },
    )
}

/// `loss.backward()` with the sink open for `wanted`: returns the graph's gradients and, per
/// tensor of `wanted`, what checkpointed blocks computed for it (summed over blocks).
pub fn backward_with_checkpoints(
    loss: &Tensor,
    wanted: &[&Tensor],
) -> candle_core::Result<(GradStore, HashMap<TensorId, Tensor>)> {
    let map = wanted.iter().map(|t| (t.id(), None)).collect();
    let previous = SINK.with(|s| s.borrow_mut().replace(map));
    let grads = loss.backward();
    let collected = SINK.with(|s| std::mem::replace(&mut *s.borrow_mut(), previous));
    let collected = collected
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(id, g)| g.map(|g| (id, g)))
        .collect();
    Ok((grads?, collected))
}

/// Adds a nested backward's gradients of the sink's tensors to the sink.
fn collect(grads: &GradStore, name: &str) -> candle_core::Result<()> {
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(map) = s.as_mut() else {
            candle_core::bail!(
                "{name} is gradient-checkpointed: run backward through sd_lora::train::step::grads_of (or ops::checkpoint::backward_with_checkpoints), or the block's weight gradients would be lost"
            );
        };
        for (id, slot) in map.iter_mut() {
            if let Some(g) = grads.get_id(*id) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    })
}

struct CheckpointOp {
    /// The forward's output until the node takes it.
    y: Stored,
    name: &'static str,
    f: Block,
}

impl CustomOp3 for CheckpointOp {
    fn name(&self) -> &'static str {
        "sd-lora-checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.y.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.y.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // inputs that carried a graph become leaves of the recomputation
        let leaf = |t: &Tensor| -> candle_core::Result<Option<Var>> {
            if t.track_op() {
                Ok(Some(Var::from_tensor(&t.detach())?))
            } else {
                Ok(None)
            }
        };
        let (va, vb) = (leaf(a)?, leaf(b)?);
        let ta = va
            .as_ref()
            .map_or_else(|| a.detach(), |v| v.as_tensor().clone());
        let tb = vb
            .as_ref()
            .map_or_else(|| b.detach(), |v| v.as_tensor().clone());
        let y = (self.f)(&ta, &tb).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let surrogate =
            (y.to_dtype(DType::F32)? * grad.detach().to_dtype(DType::F32)?)?.sum_all()?;
        let grads = surrogate.backward()?;
        collect(&grads, self.name)?;
        let g = |v: &Option<Var>| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned());
        Ok((g(&va), g(&vb), None))
    }
}
