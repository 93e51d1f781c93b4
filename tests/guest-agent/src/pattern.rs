//! Deterministic disk pattern and the hash of a written region.
//!
//! Shared between the guest agent (`disk` check) and host-side tests, which include this file
//! with `#[path = ".../tests/guest-agent/src/pattern.rs"] mod pattern;` to check a disk image
//! after the guest wrote it. Keep it free of dependencies: `core` only, no `crate::` paths.

/// SplitMix64 finaliser: a well-mixed 64-bit word for every input.
pub const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern's 8-byte word number `index` (bytes `8*index .. 8*index+8`, little endian).
pub const fn pattern_word(seed: u64, index: u64) -> u64 {
    splitmix64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index)
}

/// The pattern byte at byte `offset` of the disk for `seed`.
pub const fn pattern_byte(seed: u64, offset: u64) -> u8 {
    pattern_word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the pattern bytes for disk offsets `offset .. offset + buf.len()`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = 0;
    // Unaligned head, byte by byte.
    while pos < buf.len() && (offset + pos as u64) & 7 != 0 {
        buf[pos] = pattern_byte(seed, offset + pos as u64);
        pos += 1;
    }
    // Whole words.
    while pos + 8 <= buf.len() {
        let word = pattern_word(seed, (offset + pos as u64) / 8);
        buf[pos..pos + 8].copy_from_slice(&word.to_le_bytes());
        pos += 8;
    }
    // Tail.
    while pos < buf.len() {
        buf[pos] = pattern_byte(seed, offset + pos as u64);
        pos += 1;
    }
}

/// Incremental FNV-1a, 64 bit.
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Fnv64 {
    pub const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    pub const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub const fn new() -> Self {
        Fnv64(Self::OFFSET_BASIS)
    }

    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    pub const fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a 64 of `data`.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = Fnv64::new();
    h.update(data);
    h.finish()
}

/// FNV-1a 64 of the pattern bytes `0 .. len` for `seed`: the `disk.fnv64` fact.
pub fn pattern_fnv64(seed: u64, len: u64) -> u64 {
    let mut h = Fnv64::new();
    let mut buf = [0u8; 4096];
    let mut off = 0;
    while off < len {
        let n = core::cmp::min(buf.len() as u64, len - off) as usize;
        fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference() {
        // First output of the reference SplitMix64 generator seeded with 0.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn fnv1a64_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn pattern_fixed_values() {
        let mut first = [0u8; 8];
        fill(1, 0, &mut first);
        assert_eq!(first, pattern_word(1, 0).to_le_bytes());
        assert_eq!(pattern_word(1, 0), PATTERN_WORD_1_0);
        assert_eq!(pattern_fnv64(1, 8 << 20), PATTERN_FNV64_SEED1_8MIB);
    }

    #[test]
    fn fill_matches_pattern_byte_at_any_alignment() {
        for start in 0..17u64 {
            let mut buf = [0u8; 37];
            fill(7, start, &mut buf);
            for (i, &b) in buf.iter().enumerate() {
                assert_eq!(b, pattern_byte(7, start + i as u64));
            }
        }
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(pattern_fnv64(1, 4096), pattern_fnv64(2, 4096));
        assert_ne!(pattern_word(0, 0), pattern_word(1, 0));
    }

    const PATTERN_WORD_1_0: u64 = 0x6e78_9e6a_a1b9_65f4;
    const PATTERN_FNV64_SEED1_8MIB: u64 = 0x2d12_cf5d_ff6a_f8cd;
}
