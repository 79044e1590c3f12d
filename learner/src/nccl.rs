//! NCCL all-reduce between GPU ranks (feature `nccl`), through cudarc with libnccl and libcuda
//! loaded at run time.
//!
//! Rank 0 makes the communicator's unique id ([`unique_id`]) and publishes its 128 bytes through
//! the state store under the job's key; the other ranks read it and join with [`NcclRing::new`].
//! The learner's gradients live on the host (the optimizer is host-side, see
//! `rlhf_model::optim`), so each reduction uploads the flat buffer, reduces it on the device and
//! downloads the sum.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::collective::Collective;

fn io<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> std::io::Error + '_ {
    move |e| std::io::Error::other(format!("{what}: {e:?}"))
}

/// A new communicator id (call on rank 0 only).
pub fn unique_id() -> std::io::Result<[u8; 128]> {
    let id = Id::new().map_err(io("ncclGetUniqueId"))?;
    Ok(id.internal().map(|c| c as u8))
}

/// One rank of an NCCL communicator on one GPU.
pub struct NcclRing {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator and stream are used from one thread at a time (the engine thread owns
// the collective); NCCL communicators may move between threads between calls.
unsafe impl Send for NcclRing {}

impl NcclRing {
    /// Joins the communicator `id` as `rank` of `world`, on GPU `ordinal`.
    pub fn new(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: [u8; 128],
    ) -> std::io::Result<NcclRing> {
        let ctx = CudaContext::new(ordinal).map_err(io("cuda context"))?;
        let stream = ctx.default_stream();
        let id = Id::uninit(id.map(|b| b as ::core::ffi::c_char));
        let comm =
            Comm::from_rank(stream.clone(), rank, world, id).map_err(io("ncclCommInitRank"))?;
        Ok(NcclRing {
            comm,
            stream,
            rank,
            world,
        })
    }
}

impl Collective for NcclRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> std::io::Result<()> {
        let mut device = self.stream.clone_htod(buf).map_err(io("upload"))?;
        self.comm
            .all_reduce_in_place(&mut device, &ReduceOp::Sum)
            .map_err(io("ncclAllReduce"))?;
        let host = self.stream.clone_dtoh(&device).map_err(io("download"))?;
        buf.copy_from_slice(&host);
        Ok(())
    }
}
