//! The VMM library: everything that owns KVM file descriptors, threads and devices.
//! `main.rs` only parses the command line and prints the outcome.

#![deny(missing_docs)]

pub mod config;
pub mod device_manager;
pub mod event_loop;
pub mod fatal;
pub mod fdt;
pub mod interrupts;
pub mod irq_routing;
pub mod kernel;
pub mod marks;
pub mod overhead;
pub mod pci;
pub mod remapper;
pub mod seccomp;
pub mod stats;
pub mod vcpu;
pub mod vm;
pub mod worker;
