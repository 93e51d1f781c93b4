//! x86_64 platform facts for the VMM: the guest physical memory map, boot-protocol data
//! (zero page, PVH start info, E820), CPUID filtering and initial register values.
//!
//! Everything here is *computed*, never applied: this crate has no file descriptors and
//! does not talk to KVM. The `vmm` crate applies the values.

#![deny(missing_docs)]

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
