//! The signed device request. A device proves who it is with its device key (the Ed25519 key
//! that signs its install receipts) on every request that changes what the depot knows of it:
//!
//! 1. `GET /api/v1/nonce` gives a fresh nonce (single use, short-lived, kept in the depot's
//!    memory only);
//! 2. the device signs [`message`]: the method, the path, that nonce and the BLAKE3 of the body;
//! 3. it sends the request with its public key, the nonce and the signature in three headers.
//!
//! The depot takes the nonce back before it checks anything else, so a request captured on
//! the wire and sent again is refused as replayed, and a body changed in flight breaks the
//! signature. The device id is the key's id (16 hex digits), as in receipts.

use ota_bundle::{PublicKey, SecretKey};

/// The device's public key, 64 hex digits.
pub const KEY_HEADER: &str = "x-quote-edge-device";
/// The nonce from `GET /api/v1/nonce`.
pub const NONCE_HEADER: &str = "x-quote-edge-nonce";
/// The Ed25519 signature of [`message`], 128 hex digits.
pub const SIGNATURE_HEADER: &str = "x-quote-edge-signature";
/// Optional on bundle downloads: which device is downloading, for the depot's byte counts only
/// (downloads are not authenticated: bundles are static files any cache may serve).
pub const DOWNLOADER_HEADER: &str = "x-quote-edge-downloader";
/// Length of a nonce, in hex digits.
pub const NONCE_LEN: usize = 32;

/// What a device key signs for one request.
pub fn message(method: &str, path: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    format!(
        "quote-edge depot-request v1\n{method} {path}\n{nonce}\n{}",
        ota_bundle::chunk_hash(body)
    )
    .into_bytes()
}

/// The three header values of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub key: String,
    pub nonce: String,
    pub signature: String,
}

/// Signs one request with the device key.
pub fn sign(key: &SecretKey, method: &str, path: &str, nonce: &str, body: &[u8]) -> Signed {
    Signed {
        key: key.public().to_hex(),
        nonce: nonce.to_owned(),
        signature: hex::encode(key.sign(&message(method, path, nonce, body))),
    }
}

/// Why a signed request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the request is not signed: header `{0}` is missing")]
    Missing(&'static str),
    #[error("header `{header}` is not valid: {reason}")]
    Malformed {
        header: &'static str,
        reason: &'static str,
    },
    #[error("the nonce is unknown, expired or already used: the request is replayed or stale")]
    Replayed,
    #[error("the signature does not verify with the device key {device}")]
    BadSignature { device: String },
}

/// Checks a signature (the nonce was already taken back by the caller) and returns the key.
pub fn verify(
    key: &str,
    signature: &str,
    method: &str,
    path: &str,
    nonce: &str,
    body: &[u8],
) -> Result<PublicKey, AuthError> {
    let public = PublicKey::from_hex(key).map_err(|_| AuthError::Malformed {
        header: KEY_HEADER,
        reason: "not an Ed25519 public key in 64 hex digits",
    })?;
    let signature: [u8; 64] = hex::decode(signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(AuthError::Malformed {
            header: SIGNATURE_HEADER,
            reason: "not 128 hex digits",
        })?;
    if !public.verify(&message(method, path, nonce, body), &signature) {
        return Err(AuthError::BadSignature {
            device: public.id().to_string(),
        });
    }
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_the_method_the_path_the_nonce_and_the_body() {
        let key = SecretKey::from_seed([7; 32]);
        let signed = sign(&key, "POST", "/api/v1/report", "ab", b"{}");
        let ok = verify(
            &signed.key,
            &signed.signature,
            "POST",
            "/api/v1/report",
            "ab",
            b"{}",
        );
        assert_eq!(ok.unwrap().id(), key.public().id());
        for (method, path, nonce, body) in [
            ("GET", "/api/v1/report", "ab", &b"{}"[..]),
            ("POST", "/api/v1/poll", "ab", b"{}"),
            ("POST", "/api/v1/report", "ac", b"{}"),
            ("POST", "/api/v1/report", "ab", b"{ }"),
        ] {
            assert_eq!(
                verify(&signed.key, &signed.signature, method, path, nonce, body),
                Err(AuthError::BadSignature {
                    device: key.public().id().to_string()
                }),
                "{method} {path} {nonce}"
            );
        }
        let other = SecretKey::from_seed([8; 32]).public().to_hex();
        assert!(matches!(
            verify(
                &other,
                &signed.signature,
                "POST",
                "/api/v1/report",
                "ab",
                b"{}"
            ),
            Err(AuthError::BadSignature { .. })
        ));
        assert!(matches!(
            verify("zz", &signed.signature, "POST", "/", "ab", b""),
            Err(AuthError::Malformed {
                header: KEY_HEADER,
                ..
            })
        ));
        assert!(matches!(
            verify(&signed.key, "00", "POST", "/", "ab", b""),
            Err(AuthError::Malformed {
                header: SIGNATURE_HEADER,
                ..
            })
        ));
    }
}
