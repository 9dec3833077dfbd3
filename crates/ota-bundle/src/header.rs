//! The fixed 32-byte header.

use crate::BundleError;

pub const MAGIC: &[u8; 8] = b"QEDGEBND";
pub const HEADER_LEN: usize = 32;
pub const MAX_MANIFEST_LEN: u32 = 1 << 20;
pub const MAX_SIGNATURES: u16 = 16;
/// Key id (8) + Ed25519 signature (64).
pub const SIGNATURE_LEN: usize = 72;
/// Largest payload: 16 GiB.
pub const MAX_PAYLOAD_LEN: u64 = 16 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub manifest_len: u32,
    pub signature_count: u16,
    pub payload_len: u64,
}

impl Header {
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, BundleError> {
        if &bytes[0..8] != MAGIC {
            return Err(BundleError::BadMagic);
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let format = u16_at(8);
        if format != 1 {
            return Err(BundleError::UnsupportedFormat(format));
        }
        let check = |field: &'static str, value: u64, ok: bool, rule: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(BundleError::Header { field, value, rule })
            }
        };
        let flags = u16_at(10);
        check("flags", flags.into(), flags == 0, "must be 0")?;
        let manifest_len = u32_at(12);
        check(
            "manifest_len",
            manifest_len.into(),
            (2..=MAX_MANIFEST_LEN).contains(&manifest_len),
            "must be 2 to 1048576",
        )?;
        let signature_count = u16_at(16);
        check(
            "signature_count",
            signature_count.into(),
            (1..=MAX_SIGNATURES).contains(&signature_count),
            "must be 1 to 16",
        )?;
        let reserved = u16_at(18);
        check("reserved", reserved.into(), reserved == 0, "must be 0")?;
        let payload_len = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
        check(
            "payload_len",
            payload_len,
            payload_len <= MAX_PAYLOAD_LEN,
            "must be at most 16 GiB",
        )?;
        let reserved = u32_at(28);
        check("reserved", reserved.into(), reserved == 0, "must be 0")?;
        Ok(Header {
            manifest_len,
            signature_count,
            payload_len,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(MAGIC);
        out[8..10].copy_from_slice(&1u16.to_le_bytes());
        out[12..16].copy_from_slice(&self.manifest_len.to_le_bytes());
        out[16..18].copy_from_slice(&self.signature_count.to_le_bytes());
        out[20..28].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Offset of the first payload byte.
    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.manifest_len)
            + u64::from(self.signature_count) * SIGNATURE_LEN as u64
    }
}
