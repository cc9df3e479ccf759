//! The slot function: which slot a key belongs to.
//!
//! Two functions are offered, chosen once at load time:
//!
//! * `crc32` (default): CRC-32/IEEE of the hash tag, modulo 1024 slots. This is
//!   the function of Codis-style proxy fleets. The hash tag is the text between
//!   the first `{` and the first `}` after it; unlike Redis Cluster, an empty
//!   tag `{}` still counts, so `a{}b` hashes the empty string (Codis does the
//!   same, and fleets already rely on it to pin keys to slot 0).
//! * `crc16`: Redis Cluster's CRC16/XMODEM modulo 16384 slots, with Redis
//!   Cluster's tag rule (an empty tag means "hash the whole key"), for users who
//!   move from cluster mode and want their keys to keep their slots.

use crc::{Crc, CRC_16_XMODEM};

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashFunction {
    Crc32,
    Crc16,
}

impl HashFunction {
    pub const fn slot_count(self) -> usize {
        match self {
            HashFunction::Crc32 => 1024,
            HashFunction::Crc16 => 16384,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            HashFunction::Crc32 => "crc32",
            HashFunction::Crc16 => "crc16",
        }
    }

    /// The slot of `key`. Both slot counts are powers of two, so the modulo is
    /// a mask.
    #[inline]
    pub fn slot(self, key: &[u8]) -> usize {
        match self {
            HashFunction::Crc32 => {
                let tag = hash_tag(key, true);
                (crc32fast::hash(tag) as usize) & (self.slot_count() - 1)
            }
            HashFunction::Crc16 => {
                let tag = hash_tag(key, false);
                (CRC16.checksum(tag) as usize) & (self.slot_count() - 1)
            }
        }
    }
}

/// The part of `key` that is hashed. `empty_tag_counts` selects the Codis rule
/// (`{}` hashes the empty string) over the Redis Cluster rule (`{}` is no tag).
#[inline]
pub fn hash_tag(key: &[u8], empty_tag_counts: bool) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') else {
        return key;
    };
    if len == 0 && !empty_tag_counts {
        return key;
    }
    &key[open + 1..open + 1 + len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_check_values() {
        // The catalogued check values of both CRCs ("123456789").
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(CRC16.checksum(b"123456789"), 0x31C3);
    }

    #[test]
    fn crc32_slots() {
        let f = HashFunction::Crc32;
        assert_eq!(f.slot_count(), 1024);
        assert_eq!(f.slot(b"123456789"), 0xCBF4_3926 & 1023);
        assert_eq!(f.slot(b"123456789"), 294);
        // The empty key and the empty tag both hash the empty string: crc32("") = 0.
        assert_eq!(f.slot(b""), 0);
        assert_eq!(f.slot(b"a{}b"), 0);
        assert_eq!(f.slot(b"{}"), 0);
        // Tags: only the first `{` and the first `}` after it matter.
        assert_eq!(f.slot(b"x{123456789}y"), 294);
        assert_eq!(f.slot(b"{123456789}{zz}"), 294);
        assert_eq!(f.slot(b"}{123456789}"), 294);
        assert_eq!(f.slot(b"{123456789"), f.slot(b"{123456789"));
        assert_ne!(f.slot(b"{123456789"), 294);
        // Binary keys are fine.
        assert_eq!(
            f.slot(b"\x00{\xff\x00}"),
            (crc32fast::hash(b"\xff\x00") & 1023) as usize
        );
        // Independent value: zlib.crc32(b"foo") = 0x8C736521.
        assert_eq!(f.slot(b"foo"), 0x8C73_6521 & 1023);
    }

    #[test]
    fn crc16_slots_match_redis_cluster() {
        let f = HashFunction::Crc16;
        assert_eq!(f.slot_count(), 16384);
        // Values of CLUSTER KEYSLOT on a real Redis Cluster.
        assert_eq!(f.slot(b"foo"), 12182);
        assert_eq!(f.slot(b"{user1000}.following"), 3443);
        assert_eq!(f.slot(b"{user1000}.followers"), 3443);
        assert_eq!(f.slot(b"user1000"), 3443);
        assert_eq!(f.slot(b"123456789"), 0x31C3);
        // Empty tag: Redis Cluster hashes the whole key.
        assert_eq!(
            f.slot(b"foo{}{bar}"),
            CRC16.checksum(b"foo{}{bar}") as usize & 16383
        );
        assert_eq!(
            f.slot(b"foo{{bar}}zap"),
            CRC16.checksum(b"{bar") as usize & 16383
        );
        assert_eq!(f.slot(b"foo{bar}{zap}"), f.slot(b"bar"));
    }

    #[test]
    fn hash_tag_rules() {
        assert_eq!(hash_tag(b"abc", true), b"abc");
        assert_eq!(hash_tag(b"a{b}c", true), b"b");
        assert_eq!(hash_tag(b"a{}c", true), b"");
        assert_eq!(hash_tag(b"a{}c", false), b"a{}c");
        assert_eq!(hash_tag(b"a{b", false), b"a{b");
        assert_eq!(hash_tag(b"a}b{", false), b"a}b{");
    }
}
