//! PCI on the VMM side. This module owns the root complex's places on the buses (ECAM on
//! MMIO, the 0xCF8/0xCFC mechanism on port I/O, both only when the VM has PCI devices) and
//! every PCI function's MSI-X vectors as KVM resources: one allocated GSI and one irqfd per
//! vector, registered with the interrupt router as a *held* vector (masked ⇒ parked, triggers
//! set the PBA bit), and the [`MsixSink`] through which the function's MSI-X table pushes
//! vector changes into the router — each guest table or Message Control write becomes one
//! `KVM_SET_GSI_ROUTING`, translated through the remapping unit with the function's BDF as
//! requester ID. A PCI device model only sees [`MsixVectors`] (as a later VFIO device would).

use std::sync::{Arc, Mutex};

use arch::layout;
use devices::pci::msix::{MsixSink, MsixVectorUpdate, MsixVectors};
use devices::pci::root::{PciConfigIo, PciEcam, PciRoot, PCI_CONFIG_IO_LEN};
use devices::sync::lock;
use devices::{Bus, InterruptLine};

use crate::interrupts::{Gsi, InterruptError, InterruptManager, IrqfdLine};
use crate::irq_routing::{HeldVector, IrqRouter, MsiSource};

/// Errors while wiring PCI.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// A GSI or irqfd for a vector could not be set up.
    #[error("Cannot set up MSI-X vector {0}")]
    Vector(u16, #[source] InterruptError),
    /// The ECAM window or config ports overlap something.
    #[error("Cannot place the PCI configuration mechanism")]
    Bus(#[source] devices::BusError),
}

/// Requester ID (BDF) of function 0 of `slot` on bus 0.
pub fn bdf(slot: usize) -> u16 {
    (slot as u16 & 0x1f) << 3
}

/// A function's vectors as the router sees them: GSIs, requester ID.
pub struct MsixRouting {
    router: Arc<Mutex<IrqRouter>>,
    gsis: Vec<Gsi>,
    source_id: u16,
}

impl MsixSink for MsixRouting {
    fn vectors_changed(&self, updates: &[MsixVectorUpdate]) {
        let sources: Vec<MsiSource> = updates
            .iter()
            .filter_map(|u| {
                let gsi = self.gsis.get(usize::from(u.vector))?.gsi();
                Some(MsiSource {
                    gsi,
                    msg: u.msg,
                    source_id: self.source_id,
                })
            })
            .collect();
        // One batch: one KVM_SET_GSI_ROUTING for the whole guest write.
        lock(&self.router).set_msi_sources(&sources);
    }
}

/// Reports a held vector's parked triggers as its pending bit.
struct HeldHandle {
    vectors: Arc<MsixVectors>,
    vector: u16,
}

impl HeldVector for HeldHandle {
    fn fired_while_held(&self) {
        self.vectors.set_pending(self.vector);
    }
}

/// What a PCI function's MSI-X capability needs from the VMM.
pub struct MsixResources {
    /// The device side (one irqfd per vector).
    pub vectors: Arc<MsixVectors>,
    /// Where the function's table pushes its changes.
    pub sink: Arc<MsixRouting>,
    /// The irqfd lines, for counters.
    pub lines: Vec<Arc<IrqfdLine>>,
}

impl MsixResources {
    /// The GSIs of the vectors, in vector order.
    pub fn gsis(&self) -> Vec<u32> {
        self.sink.gsis.iter().map(Gsi::gsi).collect()
    }
}

/// Allocates `count` vectors for requester `source_id`: GSIs, irqfds, held in the router
/// until the guest enables and unmasks them.
pub fn msix_vectors(
    count: usize,
    source_id: u16,
    interrupts: &Arc<InterruptManager>,
    router: &Arc<Mutex<IrqRouter>>,
) -> Result<MsixResources, PciSetupError> {
    let mut gsis = Vec::with_capacity(count);
    let mut lines = Vec::with_capacity(count);
    for v in 0..count {
        let v = v as u16;
        let gsi = interrupts
            .allocate_msi()
            .map_err(|e| PciSetupError::Vector(v, e))?;
        let line = interrupts
            .irqfd_line(gsi.gsi())
            .map_err(|e| PciSetupError::Vector(v, e))?;
        gsis.push(gsi);
        lines.push(line);
    }
    let vectors = MsixVectors::new(
        lines
            .iter()
            .map(|l| l.clone() as Arc<dyn InterruptLine>)
            .collect(),
    );
    {
        let mut r = lock(router);
        for (v, gsi) in gsis.iter().enumerate() {
            r.register_held_vector(
                gsi.gsi(),
                source_id,
                Arc::new(HeldHandle {
                    vectors: vectors.clone(),
                    vector: v as u16,
                }),
            );
        }
    }
    Ok(MsixResources {
        vectors,
        sink: Arc::new(MsixRouting {
            router: router.clone(),
            gsis,
            source_id,
        }),
        lines,
    })
}

/// Puts `root`'s configuration mechanisms on the buses: ECAM for bus 0 at
/// `layout::PCI_ECAM_START` (`pci-ecam`) and ports 0xCF8-0xCFF (`pci-config`).
pub fn place_root(root: PciRoot, mmio: &mut Bus, pio: &mut Bus) -> Result<(), PciSetupError> {
    let root = Arc::new(root);
    mmio.insert_named(
        "pci-ecam",
        Arc::new(Mutex::new(PciEcam(root.clone()))),
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_BUS0_SIZE,
    )
    .map_err(PciSetupError::Bus)?;
    pio.insert_named(
        "pci-config",
        Arc::new(Mutex::new(PciConfigIo::new(root))),
        u64::from(layout::PCI_CONFIG_PORT),
        PCI_CONFIG_IO_LEN,
    )
    .map_err(PciSetupError::Bus)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_is_slot_shifted_by_three() {
        assert_eq!(bdf(1), 0x08);
        assert_eq!(bdf(31), 0xf8);
    }
}
