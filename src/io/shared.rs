//! What every stream of one engine shares: the backend, the buffer pool,
//! the config, the owners' shares and the reads parked ahead.

use super::backend::ReadBackend;
use super::buffer::BufferPool;
use super::config::IoConfig;
use super::owner::Owners;
use super::prefetch::Parking;

pub(super) struct EngineInner {
    pub(super) backend: Box<dyn ReadBackend>,
    pub(super) pool: BufferPool,
    pub(super) cfg: IoConfig,
    /// The bound on the buffers of each owner's streams.
    pub(super) owners: Owners,
    /// Reads started ahead of the request that will want them.
    pub(super) parking: Parking,
}
