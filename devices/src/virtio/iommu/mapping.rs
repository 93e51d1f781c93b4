// SPDX-License-Identifier: Apache-2.0

//! The virtio-iommu's authoritative translation state: domains, their mappings, which endpoint
//! is attached where, and the `bypass` switch. Plain data, no queues, no locks: the device
//! wraps one [`MappingState`] in a mutex, applies requests to it, and fills endpoint IOTLBs
//! from [`MappingState::translate`].
//!
//! Every request operation returns the spec status as `Err(`[`ReqError`]`)` (virtio 1.2
//! §5.13.6, device-normative sections quoted where a choice was made), or on success the
//! [`Invalidation`] the caller must apply to endpoint IOTLBs *before* completing the request.
//!
//! Growth is bounded: live domains never outnumber registered endpoints (a domain exists only
//! while an endpoint is attached to it, §5.13.6.4), and mappings are capped per domain and in
//! total ([`MappingLimits`]); a MAP past a cap fails with `VIRTIO_IOMMU_S_NOMEM`.

use std::collections::{BTreeMap, BTreeSet};

use vm_memory::Permissions;

use super::protocol::*;

/// Mapping granule: the lowest bit of `page_size_mask`. MAP addresses and sizes are multiples.
pub const GRANULE: u64 = 0x1000;

/// First IOVA of the x86 MSI doorbell window, reported as a RESV_MEM/MSI region in PROBE.
pub const MSI_IOVA_START: u64 = 0xfee0_0000;
/// Last IOVA (inclusive) of the x86 MSI doorbell window.
pub const MSI_IOVA_END: u64 = 0xfeef_ffff;

/// Sizes and ranges the state enforces. [`MappingLimits::default`] is what the device offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingLimits {
    /// First IOVA the device translates (`input_range.start`).
    pub input_start: u64,
    /// Last IOVA the device translates (`input_range.end`, inclusive).
    pub input_end: u64,
    /// Smallest valid domain ID (`domain_range.start`).
    pub domain_start: u32,
    /// Largest valid domain ID (`domain_range.end`, inclusive).
    pub domain_end: u32,
    /// Most domains alive at once (also bounded by the number of endpoints).
    pub max_domains: usize,
    /// Most mappings in one domain.
    pub max_mappings_per_domain: usize,
    /// Most mappings over all domains.
    pub max_mappings: usize,
}

impl Default for MappingLimits {
    /// A 48-bit input range (what x86 guests can address with 4-level tables), 16-bit domain
    /// IDs (plenty of room for Linux's ida allocator, which starts at `domain_start`), and
    /// 128 Ki mappings per domain / 256 Ki in total: a few tens of MiB of host memory at
    /// worst, and far more than Linux keeps live (one mapping per outstanding DMA buffer, plus
    /// a flush queue of up to 256 lazily unmapped IOVAs per vCPU).
    fn default() -> Self {
        MappingLimits {
            input_start: 0,
            input_end: (1 << 48) - 1,
            domain_start: 0,
            domain_end: u32::from(u16::MAX),
            max_domains: 1024,
            max_mappings_per_domain: 1 << 17,
            max_mappings: 1 << 18,
        }
    }
}

/// Why a request failed: its status (never `VIRTIO_IOMMU_S_OK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqError {
    /// `VIRTIO_IOMMU_S_UNSUPP`.
    Unsupp,
    /// `VIRTIO_IOMMU_S_DEVERR`.
    DevErr,
    /// `VIRTIO_IOMMU_S_INVAL`.
    Inval,
    /// `VIRTIO_IOMMU_S_RANGE`.
    Range,
    /// `VIRTIO_IOMMU_S_NOENT`.
    NoEnt,
    /// `VIRTIO_IOMMU_S_NOMEM`.
    NoMem,
}

impl ReqError {
    /// The status byte for the request tail.
    pub fn status(self) -> u8 {
        match self {
            ReqError::Unsupp => VIRTIO_IOMMU_S_UNSUPP,
            ReqError::DevErr => VIRTIO_IOMMU_S_DEVERR,
            ReqError::Inval => VIRTIO_IOMMU_S_INVAL,
            ReqError::Range => VIRTIO_IOMMU_S_RANGE,
            ReqError::NoEnt => VIRTIO_IOMMU_S_NOENT,
            ReqError::NoMem => VIRTIO_IOMMU_S_NOMEM,
        }
    }
}

/// One mapping made by a MAP request; the key in [`Domain::mappings`] is its first IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of the first IOVA.
    pub phys: u64,
    /// `VIRTIO_IOMMU_MAP_F_*`.
    pub flags: u32,
}

impl Mapping {
    /// The accesses the mapping allows.
    pub fn permissions(&self) -> Permissions {
        map_flags_permissions(self.flags)
    }
}

fn map_flags_permissions(flags: u32) -> Permissions {
    match (
        flags & VIRTIO_IOMMU_MAP_F_READ != 0,
        flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
    ) {
        (true, true) => Permissions::ReadWrite,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (false, false) => Permissions::No,
    }
}

/// A domain: an address space shared by the endpoints attached to it.
#[derive(Clone, Debug, Default)]
pub struct Domain {
    /// Created with `VIRTIO_IOMMU_ATTACH_F_BYPASS`: identity translation, no mappings.
    pub bypass: bool,
    /// Mappings by first IOVA; they never overlap.
    pub mappings: BTreeMap<u64, Mapping>,
    /// Endpoints attached to the domain (never empty while the domain exists).
    pub endpoints: BTreeSet<u32>,
}

/// What a completed request invalidated: the caller must drop these entries from the named
/// endpoints' IOTLBs before completing the request, then wait until those endpoints finish the
/// requests they have in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Invalidation {
    /// Endpoints whose IOTLB holds stale entries.
    pub endpoints: Vec<u32>,
    /// IOVA ranges `(start, length)` to drop; `None` drops the whole IOTLB.
    pub ranges: Option<Vec<(u64, u64)>>,
}

impl Invalidation {
    fn whole(endpoints: Vec<u32>) -> Self {
        Invalidation {
            endpoints,
            ranges: None,
        }
    }

    /// Nothing to invalidate.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// An IOTLB entry produced by [`MappingState::translate`]: `[iova, iova + len)` maps to `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// First IOVA.
    pub iova: u64,
    /// Physical address of `iova`.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
    /// Allowed accesses.
    pub perm: Permissions,
}

/// A translation fault, as reported on the event queue (the endpoint is the caller's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: u32,
    /// First faulting IOVA.
    pub address: u64,
}

/// The identity translation, as one IOTLB entry covering (almost) the whole address space.
/// `Iotlb` ranges are half-open `u64` ranges, so the last byte cannot be included; an access
/// touching it would overflow `iova + length` and is rejected before lookup anyway.
pub const IDENTITY: IotlbEntry = IotlbEntry {
    iova: 0,
    phys: 0,
    len: u64::MAX,
    perm: Permissions::ReadWrite,
};

/// The MSI doorbell window, identity-mapped for attached endpoints once PROBE reports it.
pub const MSI_IDENTITY: IotlbEntry = IotlbEntry {
    iova: MSI_IOVA_START,
    phys: MSI_IOVA_START,
    len: MSI_IOVA_END - MSI_IOVA_START + 1,
    perm: Permissions::ReadWrite,
};

/// Domains, endpoint attachments and the bypass switch; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct MappingState {
    limits: MappingLimits,
    domains: BTreeMap<u32, Domain>,
    /// Endpoint → domain it is attached to.
    attached: BTreeMap<u32, u32>,
    /// Endpoint IDs the VMM created.
    endpoints: BTreeSet<u32>,
    /// Config field `bypass`: unattached endpoints use identity translation.
    bypass: bool,
    /// `VIRTIO_IOMMU_F_BYPASS_CONFIG` negotiated: ATTACH may carry `ATTACH_F_BYPASS`.
    bypass_domains_allowed: bool,
    /// `VIRTIO_IOMMU_F_PROBE` negotiated: the driver knows the MSI window is reserved, so MAP
    /// requests overlapping it are refused.
    reserve_msi: bool,
    /// Mappings over all domains.
    mapping_count: usize,
}

impl Default for MappingState {
    fn default() -> Self {
        MappingState::new(MappingLimits::default())
    }
}

impl MappingState {
    /// Empty state: no endpoints, no domains, `bypass` = 1.
    pub fn new(limits: MappingLimits) -> Self {
        MappingState {
            limits,
            domains: BTreeMap::new(),
            attached: BTreeMap::new(),
            endpoints: BTreeSet::new(),
            bypass: true,
            bypass_domains_allowed: false,
            reserve_msi: false,
            mapping_count: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &MappingLimits {
        &self.limits
    }

    /// Registers a valid endpoint ID.
    pub fn add_endpoint(&mut self, endpoint: u32) {
        self.endpoints.insert(endpoint);
    }

    /// Whether `endpoint` was registered.
    pub fn has_endpoint(&self, endpoint: u32) -> bool {
        self.endpoints.contains(&endpoint)
    }

    /// Registered endpoint IDs.
    pub fn endpoints(&self) -> impl Iterator<Item = u32> + '_ {
        self.endpoints.iter().copied()
    }

    /// The domain `endpoint` is attached to.
    pub fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.attached.get(&endpoint).copied()
    }

    /// A live domain.
    pub fn domain(&self, domain: u32) -> Option<&Domain> {
        self.domains.get(&domain)
    }

    /// Live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Live mappings over all domains.
    pub fn mapping_count(&self) -> usize {
        self.mapping_count
    }

    /// The `bypass` config field.
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// Records the features the driver accepted.
    pub fn set_negotiated(&mut self, bypass_config: bool, probe: bool) {
        self.bypass_domains_allowed = bypass_config;
        self.reserve_msi = probe;
    }

    /// Sets the `bypass` config field. Turning it off invalidates every unattached endpoint
    /// (their IOTLBs hold identity entries).
    pub fn set_bypass(&mut self, bypass: bool) -> Invalidation {
        let was = std::mem::replace(&mut self.bypass, bypass);
        if was && !bypass {
            Invalidation::whole(
                self.endpoints
                    .iter()
                    .copied()
                    .filter(|ep| !self.attached.contains_key(ep))
                    .collect(),
            )
        } else {
            Invalidation::default()
        }
    }

    /// Device reset: every endpoint is detached and every domain destroyed (§5.13.5). `bypass`
    /// keeps its value (§5.13.4.2: it "SHOULD NOT change on device reset").
    pub fn reset(&mut self) -> Invalidation {
        let endpoints: Vec<u32> = self.attached.keys().copied().collect();
        self.domains.clear();
        self.attached.clear();
        self.mapping_count = 0;
        self.bypass_domains_allowed = false;
        self.reserve_msi = false;
        Invalidation::whole(endpoints)
    }

    /// ATTACH `endpoint` to `domain` with `flags`, creating the domain if needed and moving
    /// the endpoint out of its previous domain (which ceases to exist if that was its last
    /// endpoint).
    ///
    /// Statuses: unknown flag bits, or `ATTACH_F_BYPASS` without BYPASS_CONFIG negotiated →
    /// INVAL (MUST); unknown endpoint → NOENT (MUST); domain outside `domain_range` → RANGE
    /// (the spec forbids the driver to send it but names no status); flag inconsistent with
    /// an existing domain → INVAL (SHOULD); domain cap → NOMEM.
    pub fn attach(
        &mut self,
        domain: u32,
        endpoint: u32,
        flags: u32,
    ) -> Result<Invalidation, ReqError> {
        let bypass = flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        if flags & !VIRTIO_IOMMU_ATTACH_F_BYPASS != 0 || (bypass && !self.bypass_domains_allowed) {
            return Err(ReqError::Inval);
        }
        if !self.endpoints.contains(&endpoint) {
            return Err(ReqError::NoEnt);
        }
        if domain < self.limits.domain_start || domain > self.limits.domain_end {
            return Err(ReqError::Range);
        }
        match self.domains.get(&domain) {
            Some(d) if d.bypass != bypass => return Err(ReqError::Inval),
            Some(_) => {}
            None => {
                // Moving the endpoint may free its old domain, but only if it is the last
                // endpoint there; keep it simple and count before the move.
                let frees_one = self
                    .attached
                    .get(&endpoint)
                    .and_then(|old| self.domains.get(old))
                    .is_some_and(|d| d.endpoints.len() == 1);
                if self.domains.len() - usize::from(frees_one) >= self.limits.max_domains {
                    return Err(ReqError::NoMem);
                }
            }
        }
        if self.attached.get(&endpoint) == Some(&domain) {
            return Ok(Invalidation::default());
        }
        self.remove_from_domain(endpoint);
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            ..Domain::default()
        });
        d.endpoints.insert(endpoint);
        self.attached.insert(endpoint, domain);
        Ok(Invalidation::whole(vec![endpoint]))
    }

    /// DETACH `endpoint` from `domain`; the domain ceases to exist with its last endpoint.
    ///
    /// Statuses: unknown endpoint → NOENT (MUST); no such domain or endpoint not attached to
    /// it → INVAL (MAY).
    pub fn detach(&mut self, domain: u32, endpoint: u32) -> Result<Invalidation, ReqError> {
        if !self.endpoints.contains(&endpoint) {
            return Err(ReqError::NoEnt);
        }
        if self.attached.get(&endpoint) != Some(&domain) {
            return Err(ReqError::Inval);
        }
        self.remove_from_domain(endpoint);
        Ok(Invalidation::whole(vec![endpoint]))
    }

    /// Takes `endpoint` out of its domain, destroying the domain if it was the last endpoint.
    fn remove_from_domain(&mut self, endpoint: u32) {
        let Some(old) = self.attached.remove(&endpoint) else {
            return;
        };
        let Some(d) = self.domains.get_mut(&old) else {
            return;
        };
        d.endpoints.remove(&endpoint);
        if d.endpoints.is_empty() {
            if let Some(d) = self.domains.remove(&old) {
                self.mapping_count -= d.mappings.len();
            }
        }
    }

    /// MAP `[virt_start, virt_end]` to `phys_start` in `domain`. Nothing needs invalidating:
    /// IOTLB misses refill from this state.
    ///
    /// Statuses, in the order checked: unknown flag bits (MMIO included: the feature is not
    /// offered) → INVAL (MUST); neither READ nor WRITE → INVAL (a mapping nothing can use);
    /// `virt_end < virt_start` → INVAL; `virt_start`, `phys_start` or `virt_end + 1` not a
    /// multiple of [`GRANULE`] → RANGE (SHOULD); outside `input_range` or physical end past
    /// 2^64 → RANGE; unknown domain → NOENT (SHOULD); bypass domain → INVAL (SHOULD); overlap
    /// with a mapping → INVAL (SHOULD); overlap with the reserved MSI window once PROBE told
    /// the driver about it → INVAL; a mapping cap → NOMEM.
    pub fn map(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Result<(), ReqError> {
        if flags & !(VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE) != 0
            || flags & (VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE) == 0
            || virt_end < virt_start
        {
            return Err(ReqError::Inval);
        }
        if !virt_start.is_multiple_of(GRANULE)
            || !phys_start.is_multiple_of(GRANULE)
            || !virt_end.wrapping_add(1).is_multiple_of(GRANULE)
        {
            return Err(ReqError::Range);
        }
        if virt_start < self.limits.input_start
            || virt_end > self.limits.input_end
            || phys_start.checked_add(virt_end - virt_start).is_none()
        {
            return Err(ReqError::Range);
        }
        let d = self.domains.get_mut(&domain).ok_or(ReqError::NoEnt)?;
        if d.bypass {
            return Err(ReqError::Inval);
        }
        let overlaps = d
            .mappings
            .range(..=virt_end)
            .next_back()
            .is_some_and(|(_, m)| m.end >= virt_start);
        if overlaps {
            return Err(ReqError::Inval);
        }
        if self.reserve_msi && virt_start <= MSI_IOVA_END && virt_end >= MSI_IOVA_START {
            return Err(ReqError::Inval);
        }
        if d.mappings.len() >= self.limits.max_mappings_per_domain
            || self.mapping_count >= self.limits.max_mappings
        {
            return Err(ReqError::NoMem);
        }
        d.mappings.insert(
            virt_start,
            Mapping {
                end: virt_end,
                phys: phys_start,
                flags,
            },
        );
        self.mapping_count += 1;
        Ok(())
    }

    /// UNMAP every mapping of `domain` that lies entirely inside `[virt_start, virt_end]`
    /// (§5.13.6.6). The range may spill over unmapped IOVAs, and unmapping nothing is OK.
    ///
    /// Statuses: `virt_end < virt_start` → INVAL; unknown domain → NOENT (SHOULD); bypass
    /// domain → INVAL (SHOULD); a mapping only partly inside the range (the UNMAP would split
    /// it) → RANGE, and nothing is removed (SHOULD).
    pub fn unmap(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    ) -> Result<Invalidation, ReqError> {
        let mut inv = Invalidation::default();
        self.unmap_into(domain, virt_start, virt_end, &mut inv)?;
        Ok(if inv.is_empty() {
            Invalidation::default()
        } else {
            inv
        })
    }

    /// [`MappingState::unmap`], writing the invalidation into `inv` (whose buffers are
    /// reused: no allocation per request). `inv` names no endpoint unless something was
    /// unmapped.
    pub fn unmap_into(
        &mut self,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        inv: &mut Invalidation,
    ) -> Result<(), ReqError> {
        inv.endpoints.clear();
        if virt_end < virt_start {
            return Err(ReqError::Inval);
        }
        let d = self.domains.get_mut(&domain).ok_or(ReqError::NoEnt)?;
        if d.bypass {
            return Err(ReqError::Inval);
        }
        // Mappings never overlap, so only two can straddle the range: the one holding
        // `virt_start` and the last one starting at or before `virt_end`.
        let Some((&last_start, last)) = d.mappings.range(..=virt_end).next_back() else {
            return Ok(());
        };
        if last_start < virt_start {
            // Nothing starts inside the range; this one only matters if it reaches into it.
            return if last.end >= virt_start {
                Err(ReqError::Range)
            } else {
                Ok(())
            };
        }
        let splits_first = d
            .mappings
            .range(..virt_start)
            .next_back()
            .is_some_and(|(_, m)| m.end >= virt_start);
        if splits_first || last.end > virt_end {
            return Err(ReqError::Range);
        }
        let ranges = inv.ranges.get_or_insert_with(Vec::new);
        ranges.clear();
        if last_start == virt_start {
            // The last mapping starting inside starts first: the only one (the common case),
            // no further search.
            if let Some(m) = d.mappings.remove(&last_start) {
                ranges.push((last_start, (m.end - last_start).saturating_add(1)));
            }
        } else {
            // Each removal is O(log n); no list of keys is built first.
            while let Some((&s, _)) = d.mappings.range(virt_start..=virt_end).next() {
                if let Some(m) = d.mappings.remove(&s) {
                    // `end - s + 1` cannot overflow: MAP keeps `end` inside a 48-bit-ish
                    // input range, and saturating covers a custom full-range limit.
                    ranges.push((s, (m.end - s).saturating_add(1)));
                }
            }
        }
        if ranges.is_empty() {
            return Ok(());
        }
        self.mapping_count -= ranges.len();
        inv.endpoints.extend(d.endpoints.iter().copied());
        Ok(())
    }

    /// Translates an access of `len` bytes at `iova` by `endpoint`: the IOTLB entries that
    /// cover it (whole mappings, or the identity), or the fault to report.
    ///
    /// Faults: an unattached endpoint with `bypass` off → DOMAIN; a gap or a mapping without
    /// the needed permission → MAPPING at the first such IOVA; an access reaching byte
    /// 2^64 - 1 or wrapping → MAPPING at `iova`. Flags carry READ/WRITE from `access` and ADDRESS.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<Vec<IotlbEntry>, Fault> {
        let fault = |reason, address| Fault {
            reason,
            flags: access_fault_flags(access) | VIRTIO_IOMMU_FAULT_F_ADDRESS,
            address,
        };
        if len == 0 {
            return Ok(Vec::new());
        }
        // IOTLB ranges are half-open `u64` ranges: the access's exclusive end must fit.
        let Some(end) = iova.checked_add(len) else {
            return Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING, iova));
        };
        let last = end - 1;
        let domain = match self.attached.get(&endpoint) {
            None if self.bypass => return Ok(vec![IDENTITY]),
            None => return Err(fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, iova)),
            Some(id) => match self.domains.get(id) {
                Some(d) => d,
                // Unreachable: attached endpoints always have a live domain.
                None => return Err(fault(VIRTIO_IOMMU_FAULT_R_DOMAIN, iova)),
            },
        };
        if domain.bypass {
            return Ok(vec![IDENTITY]);
        }
        let mut entries = Vec::new();
        let mut cursor = iova;
        loop {
            if self.reserve_msi && (MSI_IOVA_START..=MSI_IOVA_END).contains(&cursor) {
                // PROBE reported this window as RESV_MEM/MSI: "translated 1:1" (virtio 1.2
                // §5.13.6.8.2.1), whatever the domain maps (MAP refuses to overlap it).
                entries.push(MSI_IDENTITY);
                if MSI_IOVA_END >= last {
                    return Ok(entries);
                }
                cursor = MSI_IOVA_END + 1;
                continue;
            }
            let Some((&start, m)) = domain
                .mappings
                .range(..=cursor)
                .next_back()
                .filter(|(_, m)| m.end >= cursor)
            else {
                return Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING, cursor));
            };
            if !m.permissions().allow(access) {
                return Err(fault(VIRTIO_IOMMU_FAULT_R_MAPPING, cursor));
            }
            entries.push(IotlbEntry {
                iova: start,
                phys: m.phys,
                // Cached up to (excluding) byte u64::MAX at most; `last` is below it.
                len: (m.end - start).saturating_add(1).min(u64::MAX - start),
                perm: m.permissions(),
            });
            if m.end >= last {
                return Ok(entries);
            }
            cursor = m.end + 1;
        }
    }
}

/// Fault flags (`VIRTIO_IOMMU_FAULT_F_READ`/`_WRITE`) for an access.
pub fn access_fault_flags(access: Permissions) -> u32 {
    let mut flags = 0;
    if access.allow(Permissions::Read) {
        flags |= VIRTIO_IOMMU_FAULT_F_READ;
    }
    if access.allow(Permissions::Write) {
        flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
    const PAGE: u64 = GRANULE;

    /// Endpoints 1, 2 and 3 registered, bypass on, BYPASS_CONFIG and PROBE negotiated.
    fn state() -> MappingState {
        let mut s = MappingState::default();
        for ep in 1..=3 {
            s.add_endpoint(ep);
        }
        s.set_negotiated(true, true);
        s
    }

    /// `state()` with endpoint 1 attached to domain 10.
    fn attached() -> MappingState {
        let mut s = state();
        s.attach(10, 1, 0).unwrap();
        s
    }

    fn keys(s: &MappingState, domain: u32) -> Vec<u64> {
        s.domain(domain).unwrap().mappings.keys().copied().collect()
    }

    #[test]
    fn statuses_match_spec_values() {
        assert_eq!(ReqError::Unsupp.status(), 2);
        assert_eq!(ReqError::DevErr.status(), 3);
        assert_eq!(ReqError::Inval.status(), 4);
        assert_eq!(ReqError::Range.status(), 5);
        assert_eq!(ReqError::NoEnt.status(), 6);
        assert_eq!(ReqError::NoMem.status(), 8);
    }

    #[test]
    fn attach_creates_domain_and_invalidates_endpoint() {
        let mut s = state();
        let inv = s.attach(10, 1, 0).unwrap();
        assert_eq!(inv, Invalidation::whole(vec![1]));
        assert_eq!(s.domain_of(1), Some(10));
        assert_eq!(s.domain_count(), 1);
        assert!(!s.domain(10).unwrap().bypass);
    }

    #[test]
    fn attach_rejects_unknown_endpoint_with_noent() {
        let mut s = state();
        assert_eq!(s.attach(10, 99, 0), Err(ReqError::NoEnt));
        assert_eq!(s.domain_count(), 0);
    }

    #[test]
    fn attach_rejects_domain_outside_range() {
        let mut s = state();
        let past_end = s.limits().domain_end + 1;
        assert_eq!(s.attach(past_end, 1, 0), Err(ReqError::Range));
        assert_eq!(s.attach(u32::MAX, 1, 0), Err(ReqError::Range));
    }

    #[test]
    fn attach_rejects_unknown_flags() {
        let mut s = state();
        assert_eq!(s.attach(10, 1, 2), Err(ReqError::Inval));
        assert_eq!(s.attach(10, 1, 0x8000_0000), Err(ReqError::Inval));
    }

    #[test]
    fn attach_bypass_flag_needs_bypass_config() {
        let mut s = state();
        s.set_negotiated(false, true);
        assert_eq!(
            s.attach(10, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS),
            Err(ReqError::Inval)
        );
        s.set_negotiated(true, true);
        s.attach(10, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS).unwrap();
        assert!(s.domain(10).unwrap().bypass);
    }

    #[test]
    fn attach_rejects_bypass_flag_inconsistent_with_domain() {
        let mut s = attached();
        assert_eq!(
            s.attach(10, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS),
            Err(ReqError::Inval)
        );
        s.attach(20, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS).unwrap();
        assert_eq!(s.attach(20, 3, 0), Err(ReqError::Inval));
    }

    #[test]
    fn attach_shares_domain_between_endpoints() {
        let mut s = attached();
        s.attach(10, 2, 0).unwrap();
        let d = s.domain(10).unwrap();
        assert_eq!(d.endpoints.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn attach_to_same_domain_is_a_no_op() {
        let mut s = attached();
        s.map(10, 0, PAGE - 1, 0, RW).unwrap();
        assert!(s.attach(10, 1, 0).unwrap().is_empty());
        assert_eq!(s.mapping_count(), 1);
    }

    #[test]
    fn attach_moves_endpoint_and_frees_old_domain_with_its_mappings() {
        let mut s = attached();
        s.map(10, 0, PAGE - 1, 0, RW).unwrap();
        let inv = s.attach(11, 1, 0).unwrap();
        assert_eq!(inv.endpoints, vec![1]);
        assert_eq!(s.domain_of(1), Some(11));
        assert!(s.domain(10).is_none());
        assert_eq!(s.mapping_count(), 0);
    }

    #[test]
    fn attach_away_keeps_domain_alive_for_remaining_endpoints() {
        let mut s = attached();
        s.attach(10, 2, 0).unwrap();
        s.map(10, 0, PAGE - 1, 0, RW).unwrap();
        s.attach(11, 1, 0).unwrap();
        let d = s.domain(10).unwrap();
        assert_eq!(d.endpoints.iter().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.mapping_count(), 1);
    }

    #[test]
    fn attach_respects_domain_cap() {
        let mut s = MappingState::new(MappingLimits {
            max_domains: 2,
            ..MappingLimits::default()
        });
        for ep in 1..=3 {
            s.add_endpoint(ep);
        }
        s.attach(10, 1, 0).unwrap();
        s.attach(11, 2, 0).unwrap();
        assert_eq!(s.attach(12, 3, 0), Err(ReqError::NoMem));
        // Moving endpoint 2 frees domain 11, so a new domain fits.
        s.attach(12, 2, 0).unwrap();
        assert_eq!(s.domain_count(), 2);
    }

    #[test]
    fn detach_removes_endpoint_and_last_detach_destroys_domain() {
        let mut s = attached();
        s.attach(10, 2, 0).unwrap();
        s.map(10, 0, PAGE - 1, 0, RW).unwrap();
        assert_eq!(s.detach(10, 1).unwrap().endpoints, vec![1]);
        assert!(s.domain(10).is_some());
        s.detach(10, 2).unwrap();
        assert!(s.domain(10).is_none());
        assert_eq!(s.mapping_count(), 0);
        assert_eq!(s.domain_of(2), None);
    }

    #[test]
    fn detach_rejects_unknown_endpoint_with_noent() {
        let mut s = attached();
        assert_eq!(s.detach(10, 99), Err(ReqError::NoEnt));
    }

    #[test]
    fn detach_rejects_wrong_or_missing_domain_with_inval() {
        let mut s = attached();
        s.attach(11, 2, 0).unwrap();
        assert_eq!(s.detach(11, 1), Err(ReqError::Inval));
        assert_eq!(s.detach(12, 1), Err(ReqError::Inval));
        assert_eq!(s.detach(10, 3), Err(ReqError::Inval));
        assert_eq!(s.domain_of(1), Some(10));
    }

    #[test]
    fn map_adds_mapping() {
        let mut s = attached();
        s.map(10, 0x1000, 0x2fff, 0x8000, R).unwrap();
        let m = s.domain(10).unwrap().mappings[&0x1000];
        assert_eq!(
            m,
            Mapping {
                end: 0x2fff,
                phys: 0x8000,
                flags: R
            }
        );
        assert_eq!(s.mapping_count(), 1);
    }

    #[test]
    fn map_rejects_unknown_domain_with_noent() {
        let mut s = attached();
        assert_eq!(s.map(11, 0, PAGE - 1, 0, RW), Err(ReqError::NoEnt));
    }

    #[test]
    fn map_rejects_unaligned_range_with_range() {
        let mut s = attached();
        assert_eq!(s.map(10, 0x800, 0x17ff, 0, RW), Err(ReqError::Range));
        assert_eq!(s.map(10, 0x1000, 0x1fff, 0x800, RW), Err(ReqError::Range));
        assert_eq!(s.map(10, 0x1000, 0x1ffe, 0, RW), Err(ReqError::Range));
        assert_eq!(s.mapping_count(), 0);
    }

    #[test]
    fn map_rejects_reversed_range_with_inval() {
        let mut s = attached();
        assert_eq!(s.map(10, 0x2000, 0xfff, 0, RW), Err(ReqError::Inval));
    }

    #[test]
    fn map_rejects_range_outside_input_range() {
        let mut s = attached();
        let end = s.limits().input_end;
        assert_eq!(s.map(10, end + 1, end + PAGE, 0, RW), Err(ReqError::Range));
        assert_eq!(
            s.map(10, 0, u64::MAX, 0, RW),
            Err(ReqError::Range),
            "a full 64-bit identity map does not fit a 48-bit input range"
        );
        s.map(10, end + 1 - PAGE, end, 0, RW).unwrap();
    }

    #[test]
    fn map_rejects_physical_wraparound() {
        let mut s = MappingState::new(MappingLimits {
            input_end: u64::MAX,
            ..MappingLimits::default()
        });
        s.add_endpoint(1);
        s.attach(10, 1, 0).unwrap();
        assert_eq!(
            s.map(10, 0, 2 * PAGE - 1, u64::MAX - PAGE + 1, RW),
            Err(ReqError::Range)
        );
    }

    #[test]
    fn map_rejects_missing_or_unknown_permission_flags() {
        let mut s = attached();
        assert_eq!(s.map(10, 0, PAGE - 1, 0, 0), Err(ReqError::Inval));
        assert_eq!(
            s.map(10, 0, PAGE - 1, 0, VIRTIO_IOMMU_MAP_F_MMIO | RW),
            Err(ReqError::Inval),
            "MMIO is unknown without VIRTIO_IOMMU_F_MMIO"
        );
        assert_eq!(s.map(10, 0, PAGE - 1, 0, 8 | RW), Err(ReqError::Inval));
    }

    #[test]
    fn map_accepts_write_only() {
        let mut s = attached();
        s.map(10, 0, PAGE - 1, 0, VIRTIO_IOMMU_MAP_F_WRITE).unwrap();
        let ep = 1;
        let entries = s.translate(ep, 0, 8, Permissions::Write).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].perm, Permissions::Write);
        let fault = s.translate(ep, 0, 8, Permissions::Read).unwrap_err();
        assert_eq!(fault.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_ne!(fault.flags & VIRTIO_IOMMU_FAULT_F_READ, 0);
    }

    #[test]
    fn msi_window_is_identity_for_attached_endpoints_once_reported() {
        let mut s = attached();
        let ep = 1;
        // Without PROBE negotiated the window is not reserved: unmapped, so it faults.
        s.set_negotiated(true, false);
        assert!(s
            .translate(ep, MSI_IOVA_START, 4, Permissions::Write)
            .is_err());
        s.set_negotiated(true, true);
        let entries = s
            .translate(ep, MSI_IOVA_START + 0x40, 4, Permissions::Write)
            .unwrap();
        assert_eq!(entries, vec![MSI_IDENTITY]);
        // An access running past the window needs a mapping for the rest.
        assert!(s
            .translate(ep, MSI_IOVA_END - 1, 4, Permissions::Write)
            .is_err());
    }

    #[test]
    fn map_rejects_overlap_with_inval() {
        let mut s = attached();
        s.map(10, 0x2000, 0x3fff, 0, RW).unwrap();
        assert_eq!(s.map(10, 0x3000, 0x4fff, 0, RW), Err(ReqError::Inval));
        assert_eq!(s.map(10, 0x1000, 0x2fff, 0, RW), Err(ReqError::Inval));
        assert_eq!(s.map(10, 0x0, 0xffff, 0, RW), Err(ReqError::Inval));
        assert_eq!(s.map(10, 0x2000, 0x2fff, 0, RW), Err(ReqError::Inval));
        // Adjacent on both sides is fine.
        s.map(10, 0x1000, 0x1fff, 0, RW).unwrap();
        s.map(10, 0x4000, 0x4fff, 0, RW).unwrap();
        assert_eq!(s.mapping_count(), 3);
    }

    #[test]
    fn map_rejects_bypass_domain_with_inval() {
        let mut s = state();
        s.attach(10, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS).unwrap();
        assert_eq!(s.map(10, 0, PAGE - 1, 0, RW), Err(ReqError::Inval));
    }

    #[test]
    fn map_rejects_msi_window_only_after_probe() {
        let mut s = attached();
        assert_eq!(
            s.map(10, 0xfe00_0000, 0xfeff_ffff, 0, RW),
            Err(ReqError::Inval)
        );
        s.set_negotiated(true, false);
        s.map(10, 0xfe00_0000, 0xfeff_ffff, 0, RW).unwrap();
    }

    #[test]
    fn map_respects_mapping_caps() {
        let mut s = MappingState::new(MappingLimits {
            max_mappings_per_domain: 2,
            max_mappings: 3,
            ..MappingLimits::default()
        });
        s.add_endpoint(1);
        s.add_endpoint(2);
        s.attach(10, 1, 0).unwrap();
        s.attach(11, 2, 0).unwrap();
        s.map(10, 0, PAGE - 1, 0, RW).unwrap();
        s.map(10, PAGE, 2 * PAGE - 1, 0, RW).unwrap();
        assert_eq!(
            s.map(10, 2 * PAGE, 3 * PAGE - 1, 0, RW),
            Err(ReqError::NoMem)
        );
        s.map(11, 0, PAGE - 1, 0, RW).unwrap();
        assert_eq!(s.map(11, PAGE, 2 * PAGE - 1, 0, RW), Err(ReqError::NoMem));
        // Unmapping makes room again.
        s.unmap(10, 0, PAGE - 1).unwrap();
        s.map(11, PAGE, 2 * PAGE - 1, 0, RW).unwrap();
    }

    // The seven UNMAP examples of §5.13.6.6, in units of one page.
    fn pages(first: u64, last: u64) -> (u64, u64) {
        (first * PAGE, (last + 1) * PAGE - 1)
    }

    fn map_pages(s: &mut MappingState, first: u64, last: u64) {
        let (a, b) = pages(first, last);
        s.map(10, a, b, a, RW).unwrap();
    }

    fn unmap_pages(s: &mut MappingState, first: u64, last: u64) -> Result<Invalidation, ReqError> {
        let (a, b) = pages(first, last);
        s.unmap(10, a, b)
    }

    #[test]
    fn unmap_spec_example_1_empty_range_succeeds() {
        let mut s = attached();
        assert!(unmap_pages(&mut s, 0, 4).unwrap().is_empty());
    }

    #[test]
    fn unmap_spec_example_2_exact_range() {
        let mut s = attached();
        map_pages(&mut s, 0, 9);
        let inv = unmap_pages(&mut s, 0, 9).unwrap();
        assert_eq!(inv.endpoints, vec![1]);
        assert_eq!(inv.ranges, Some(vec![(0, 10 * PAGE)]));
        assert_eq!(s.mapping_count(), 0);
    }

    #[test]
    fn unmap_spec_example_3_two_adjacent_mappings() {
        let mut s = attached();
        map_pages(&mut s, 0, 4);
        map_pages(&mut s, 5, 9);
        let inv = unmap_pages(&mut s, 0, 9).unwrap();
        assert_eq!(inv.ranges, Some(vec![(0, 5 * PAGE), (5 * PAGE, 5 * PAGE)]));
        assert!(keys(&s, 10).is_empty());
    }

    #[test]
    fn unmap_spec_example_4_partial_range_fails_and_keeps_mapping() {
        let mut s = attached();
        map_pages(&mut s, 0, 9);
        assert_eq!(unmap_pages(&mut s, 0, 4), Err(ReqError::Range));
        assert_eq!(keys(&s, 10), vec![0]);
        assert_eq!(s.mapping_count(), 1);
    }

    #[test]
    fn unmap_spec_example_5_first_of_two() {
        let mut s = attached();
        map_pages(&mut s, 0, 4);
        map_pages(&mut s, 5, 9);
        unmap_pages(&mut s, 0, 4).unwrap();
        assert_eq!(keys(&s, 10), vec![5 * PAGE]);
    }

    #[test]
    fn unmap_spec_example_6_range_spills_past_mapping() {
        let mut s = attached();
        map_pages(&mut s, 0, 4);
        unmap_pages(&mut s, 0, 9).unwrap();
        assert!(keys(&s, 10).is_empty());
    }

    #[test]
    fn unmap_spec_example_7_range_spans_a_gap() {
        let mut s = attached();
        map_pages(&mut s, 0, 4);
        map_pages(&mut s, 10, 14);
        unmap_pages(&mut s, 0, 14).unwrap();
        assert!(keys(&s, 10).is_empty());
    }

    #[test]
    fn unmap_splitting_any_mapping_removes_nothing() {
        let mut s = attached();
        map_pages(&mut s, 0, 1);
        map_pages(&mut s, 2, 3);
        map_pages(&mut s, 4, 5);
        // Covers the middle mapping fully but cuts into the last one.
        assert_eq!(unmap_pages(&mut s, 2, 4), Err(ReqError::Range));
        // Starts inside the first one.
        assert_eq!(unmap_pages(&mut s, 1, 3), Err(ReqError::Range));
        // Strictly inside one mapping.
        let mut t = attached();
        map_pages(&mut t, 0, 9);
        assert_eq!(unmap_pages(&mut t, 3, 4), Err(ReqError::Range));
        assert_eq!(keys(&s, 10), vec![0, 2 * PAGE, 4 * PAGE]);
    }

    #[test]
    fn unmap_with_unaligned_bounds_outside_mappings_is_ok() {
        let mut s = attached();
        map_pages(&mut s, 1, 1);
        s.unmap(10, 0x10, 0x2fff).unwrap();
        assert!(keys(&s, 10).is_empty());
    }

    #[test]
    fn unmap_rejects_unknown_domain_bypass_domain_and_reversed_range() {
        let mut s = attached();
        assert_eq!(s.unmap(11, 0, PAGE - 1), Err(ReqError::NoEnt));
        s.attach(12, 2, VIRTIO_IOMMU_ATTACH_F_BYPASS).unwrap();
        assert_eq!(s.unmap(12, 0, PAGE - 1), Err(ReqError::Inval));
        assert_eq!(s.unmap(10, PAGE, 0), Err(ReqError::Inval));
    }

    #[test]
    fn unmap_invalidates_every_endpoint_of_the_domain() {
        let mut s = attached();
        s.attach(10, 2, 0).unwrap();
        map_pages(&mut s, 0, 0);
        assert_eq!(unmap_pages(&mut s, 0, 0).unwrap().endpoints, vec![1, 2]);
    }

    #[test]
    fn unmap_whole_space_clears_domain() {
        let mut s = attached();
        map_pages(&mut s, 0, 0);
        map_pages(&mut s, 100, 101);
        s.unmap(10, 0, u64::MAX).unwrap();
        assert_eq!(s.mapping_count(), 0);
    }

    #[test]
    fn translate_bypass_on_gives_identity_for_unattached_endpoint() {
        let s = state();
        assert_eq!(
            s.translate(1, 0x1234, 8, Permissions::Write),
            Ok(vec![IDENTITY])
        );
    }

    #[test]
    fn translate_bypass_off_faults_unattached_endpoint_with_domain_reason() {
        let mut s = state();
        s.set_bypass(false);
        let f = s.translate(1, 0x1234, 8, Permissions::Read).unwrap_err();
        assert_eq!(
            f,
            Fault {
                reason: VIRTIO_IOMMU_FAULT_R_DOMAIN,
                flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                address: 0x1234
            }
        );
    }

    #[test]
    fn set_bypass_off_invalidates_unattached_endpoints_only() {
        let mut s = attached();
        assert_eq!(s.set_bypass(false).endpoints, vec![2, 3]);
        assert!(s.set_bypass(false).is_empty());
        assert!(s.set_bypass(true).is_empty());
    }

    #[test]
    fn translate_bypass_domain_gives_identity() {
        let mut s = state();
        s.set_bypass(false);
        s.attach(10, 1, VIRTIO_IOMMU_ATTACH_F_BYPASS).unwrap();
        assert_eq!(
            s.translate(1, 0x5000, 1, Permissions::ReadWrite),
            Ok(vec![IDENTITY])
        );
    }

    #[test]
    fn translate_returns_whole_mappings_across_boundaries() {
        let mut s = attached();
        s.map(10, 0x1000, 0x1fff, 0x10000, RW).unwrap();
        s.map(10, 0x2000, 0x3fff, 0x50000, R).unwrap();
        let e = s.translate(1, 0x1ff0, 0x20, Permissions::Read).unwrap();
        assert_eq!(
            e,
            vec![
                IotlbEntry {
                    iova: 0x1000,
                    phys: 0x10000,
                    len: 0x1000,
                    perm: Permissions::ReadWrite
                },
                IotlbEntry {
                    iova: 0x2000,
                    phys: 0x50000,
                    len: 0x2000,
                    perm: Permissions::Read
                },
            ]
        );
    }

    #[test]
    fn translate_faults_on_gap_with_mapping_reason_and_gap_address() {
        let mut s = attached();
        s.map(10, 0x1000, 0x1fff, 0x10000, RW).unwrap();
        let f = s
            .translate(1, 0x1800, 0x1000, Permissions::Read)
            .unwrap_err();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(f.address, 0x2000);
        let f = s.translate(1, 0x0, 4, Permissions::Read).unwrap_err();
        assert_eq!(f.address, 0);
    }

    #[test]
    fn translate_faults_write_to_read_only_mapping() {
        let mut s = attached();
        s.map(10, 0x1000, 0x1fff, 0x10000, R).unwrap();
        let f = s.translate(1, 0x1010, 4, Permissions::Write).unwrap_err();
        assert_eq!(
            f,
            Fault {
                reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                flags: VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                address: 0x1010
            }
        );
        assert!(s.translate(1, 0x1010, 4, Permissions::Read).is_ok());
    }

    #[test]
    fn translate_rejects_wrapping_access() {
        let s = state();
        let f = s
            .translate(1, u64::MAX - 3, 8, Permissions::Read)
            .unwrap_err();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert!(s.translate(1, u64::MAX, 1, Permissions::Read).is_err());
        assert_eq!(s.translate(1, 0, 0, Permissions::Read), Ok(vec![]));
    }

    #[test]
    fn translate_after_unmap_faults() {
        let mut s = attached();
        s.map(10, 0x1000, 0x1fff, 0x10000, RW).unwrap();
        s.unmap(10, 0x1000, 0x1fff).unwrap();
        assert!(s.translate(1, 0x1000, 4, Permissions::Read).is_err());
    }

    #[test]
    fn detach_returns_endpoint_to_bypass() {
        let mut s = attached();
        s.detach(10, 1).unwrap();
        assert_eq!(s.translate(1, 0, 4, Permissions::Read), Ok(vec![IDENTITY]));
    }

    #[test]
    fn reset_detaches_everything_but_keeps_bypass_setting() {
        let mut s = attached();
        s.attach(11, 2, 0).unwrap();
        s.map(10, 0, PAGE - 1, 0, RW).unwrap();
        s.set_bypass(false);
        let inv = s.reset();
        assert_eq!(inv.endpoints, vec![1, 2]);
        assert_eq!(s.domain_count(), 0);
        assert_eq!(s.mapping_count(), 0);
        assert!(!s.bypass());
        assert!(s.has_endpoint(1));
    }

    #[test]
    fn access_flags_cover_read_write_and_both() {
        assert_eq!(access_fault_flags(Permissions::No), 0);
        assert_eq!(
            access_fault_flags(Permissions::ReadWrite),
            VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE
        );
    }
}
