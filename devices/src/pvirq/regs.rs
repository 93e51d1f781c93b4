// SPDX-License-Identifier: Apache-2.0

//! PV-IR register offsets and bits, request-block layout, ops and statuses (spec §2, §3).

/// Size of the register page.
pub const PVIR_PAGE_SIZE: u64 = 0x1000;

/// `ID` (RO, 4 bytes).
pub const REG_ID: u64 = 0x00;
/// `VERSION` (RO, 4 bytes).
pub const REG_VERSION: u64 = 0x04;
/// `FEATURES` (RO, 4 bytes).
pub const REG_FEATURES: u64 = 0x08;
/// `MAX_HANDLES` (RO, 4 bytes).
pub const REG_MAX_HANDLES: u64 = 0x0c;
/// `CTRL` (RW, 4 bytes).
pub const REG_CTRL: u64 = 0x10;
/// `STATUS` (RO, 4 bytes).
pub const REG_STATUS: u64 = 0x14;
/// `REQUEST` (WO, 8 bytes).
pub const REG_REQUEST: u64 = 0x18;
/// `FAULT_COUNT` (RO, 4 bytes).
pub const REG_FAULT_COUNT: u64 = 0x20;
/// `LAST_FAULT` (RO, bit 63 W1C, 8 bytes).
pub const REG_LAST_FAULT: u64 = 0x28;

/// `ID` value: "PVIR" little-endian.
pub const PVIR_ID: u32 = 0x5249_5650;
/// `VERSION` value: major 1, minor 0.
pub const PVIR_VERSION: u32 = 0x0001_0000;
/// `FEATURES` bit 0: IOAPIC sources.
pub const FEATURE_IOAPIC: u32 = 1 << 0;
/// `FEATURES` bit 1: PCI sources.
pub const FEATURE_PCI: u32 = 1 << 1;
/// `FEATURES` bit 2: multi-MSI blocks.
pub const FEATURE_MULTI_MSI: u32 = 1 << 2;
/// `FEATURES` bit 3: source check (always set in version 1).
pub const FEATURE_SOURCE_CHECK: u32 = 1 << 3;
/// The `FEATURES` this VMM reports.
pub const PVIR_FEATURES: u32 =
    FEATURE_IOAPIC | FEATURE_PCI | FEATURE_MULTI_MSI | FEATURE_SOURCE_CHECK;

/// `CTRL` bit 0: remappable-format messages are translated.
pub const CTRL_ENABLE: u32 = 1 << 0;
/// `CTRL` bit 1: compatibility-format messages are blocked.
pub const CTRL_BLOCK_COMPAT: u32 = 1 << 1;
/// `CTRL` bit 31 (write 1): reset.
pub const CTRL_RESET: u32 = 1 << 31;

/// `STATUS` bit 0: enabled.
pub const STATUS_ENABLED: u32 = 1 << 0;
/// `STATUS` bit 1: compatibility format blocked.
pub const STATUS_COMPAT_BLOCKED: u32 = 1 << 1;
/// `STATUS` bit 2: `LAST_FAULT` valid.
pub const STATUS_FAULT_VALID: u32 = 1 << 2;

/// `LAST_FAULT` bits 31:16: IOAPIC pin or PCI requester ID.
pub const LAST_FAULT_SOURCE_SHIFT: u32 = 16;
/// `LAST_FAULT` bits 39:32: reason.
pub const LAST_FAULT_REASON_SHIFT: u32 = 32;
/// `LAST_FAULT` bit 40: the source is a PCI requester.
pub const LAST_FAULT_PCI: u64 = 1 << 40;
/// `LAST_FAULT` bit 63: valid (write 1 to clear).
pub const LAST_FAULT_VALID: u64 = 1 << 63;

/// Size and alignment of a request block.
pub const REQUEST_SIZE: usize = 64;

/// Request-block field offsets.
pub mod req {
    /// `op` (u16).
    pub const OP: usize = 0x00;
    /// `status` (u16, out).
    pub const STATUS: usize = 0x02;
    /// `source_type` (u8).
    pub const SOURCE_TYPE: usize = 0x04;
    /// `count` (u16).
    pub const COUNT: usize = 0x06;
    /// IOAPIC ID / PCI segment (u16).
    pub const SOURCE_HI: usize = 0x08;
    /// IOAPIC pin / PCI requester ID (u16).
    pub const SOURCE_LO: usize = 0x0a;
    /// `handle` (u16).
    pub const HANDLE: usize = 0x0c;
    /// `dest` (u32).
    pub const DEST: usize = 0x10;
    /// `vector` (u8).
    pub const VECTOR: usize = 0x14;
    /// Out: MSI address low (u32).
    pub const ADDRESS_LO: usize = 0x18;
    /// Out: MSI address high (u32).
    pub const ADDRESS_HI: usize = 0x1c;
    /// Out: MSI data (u32).
    pub const DATA: usize = 0x20;
}

/// Op `ALLOC`.
pub const OP_ALLOC: u16 = 1;
/// Op `SET`.
pub const OP_SET: u16 = 2;
/// Op `CLEAR`.
pub const OP_CLEAR: u16 = 3;
/// Op `FREE`.
pub const OP_FREE: u16 = 4;

/// `source_type` 1: IOAPIC pin.
pub const SOURCE_IOAPIC: u8 = 1;
/// `source_type` 2: PCI requester.
pub const SOURCE_PCI: u8 = 2;

/// Largest multi-MSI block.
pub const MAX_COUNT: u16 = 32;
/// Smallest vector `SET` accepts.
pub const MIN_VECTOR: u8 = 0x10;
