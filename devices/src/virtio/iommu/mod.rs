//! virtio-iommu (STUB: being written; the public surface below is the contract).

use std::ops::Deref;
use std::sync::{RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, Iommu, Iotlb, IotlbIterator};
use vm_memory::GuestAddress;
use vm_memory::Permissions;

pub mod mapping;
pub mod protocol;

/// The IOMMU as one endpoint sees it: an IOTLB filled from the endpoint's domain mappings.
/// A cheap handle (clones share state): `IommuMemory` owns one, the virtio-iommu device keeps
/// another to invalidate it.
#[derive(Debug, Default)]
pub struct EndpointIommu {
    iotlb: RwLock<Iotlb>,
}

impl EndpointIommu {
    /// An IOMMU that is never consulted (for `IommuMemory` with the IOMMU disabled).
    pub fn passthrough() -> Self {
        Self::default()
    }
}

impl Iommu for EndpointIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let guard = self.iotlb.read().unwrap_or_else(|e| e.into_inner());
        let _ = guard.deref();
        Iotlb::lookup(guard, iova, length, access).map_err(|_| IommuError::CannotResolve {
            iova_range: vm_memory::iommu::IovaRange { base: iova, length },
            reason: "stub".into(),
        })
    }
}
