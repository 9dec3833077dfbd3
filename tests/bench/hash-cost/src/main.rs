//! Hashes N deterministic bytes in 1 MiB chunks (as the bundle's chunk table does) with one
//! algorithm and prints the last digest, so that the instructions a run executes can be
//! counted: `hash-cost blake3|sha256|none BYTES`. `none` only fills the buffer (the baseline).

use std::hint::black_box;

const CHUNK: usize = 1 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(algo), Some(bytes)) = (args.next(), args.next()) else {
        eprintln!("usage: hash-cost blake3|sha256|none BYTES");
        std::process::exit(2);
    };
    let Ok(bytes) = bytes.parse::<usize>() else {
        eprintln!("hash-cost: BYTES must be a number, got {bytes:?}");
        std::process::exit(2);
    };
    // xorshift64: incompressible-looking bytes, the same on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut digest = [0u8; 32];
    for chunk in data.chunks(CHUNK) {
        let chunk = black_box(chunk);
        digest = match algo.as_str() {
            "blake3" => *blake3::hash(chunk).as_bytes(),
            "sha256" => {
                use sha2::Digest;
                sha2::Sha256::digest(chunk).into()
            }
            "none" => digest,
            other => {
                eprintln!("hash-cost: unknown algorithm {other:?}");
                std::process::exit(2);
            }
        };
    }
    let hex: String = black_box(digest).iter().map(|b| format!("{b:02x}")).collect();
    println!("{algo} {bytes} {hex}");
}
