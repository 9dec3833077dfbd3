//! Benchmark program: a fleet of simulated devices against an `ota-depot` (tests/bench/depot.sh).
//! Each device has its own key (from a seed), speaks the depot protocol through depot-proto's
//! client, downloads what it is offered (counting and hashing the bytes, writing nothing) and
//! reports a commit with its signed receipt.
//!
//! Usage:
//! - `depot-load enroll URL DEVICES`: each device polls once (enrolls);
//! - `depot-load rollout URL DEVICES VERSION`: every device polls until it is offered the
//!   version, downloads and reports, all at once, one thread per device; prints one line per
//!   device (`device <id> bytes <n> download_ms <t>`) and the total wall time.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use depot_proto::client::Client;
use depot_proto::wire::{Event, Poll, Report};
use ota_bundle::{Receipt, SecretKey};

fn key(n: usize) -> SecretKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    seed[31] = 0xd1;
    SecretKey::from_seed(seed)
}

fn poll(client: &Client, key: &SecretKey) -> Result<Option<depot_proto::wire::Offer>, String> {
    let poll = Poll {
        product: "quote-edge".into(),
        version: "1.0.0".into(),
    };
    client
        .poll(key, &poll)
        .map(|r| r.offer)
        .map_err(|e| e.to_string())
}

fn device(url: &str, n: usize, version: &str) -> Result<(String, u64, Duration), String> {
    let client = Client::new(url, Duration::from_secs(60));
    let key = key(n);
    let id = key.public().id().to_string();
    // Bounded: 600 polls 100 ms apart at most.
    let mut offer = None;
    for _ in 0..600 {
        offer = poll(&client, &key)?;
        if offer.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let offer = offer.ok_or("never offered")?;
    if offer.version != version {
        return Err(format!("offered {}, not {version}", offer.version));
    }
    let started = Instant::now();
    let mut body = client
        .download(
            &offer.bundle_path,
            0..offer.bundle_size,
            offer.bundle_size,
            Some(&id),
        )
        .map_err(|e| e.to_string())?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let took = started.elapsed();
    // The bundle path is the manifest digest's file name (FORMAT.md, "The depot protocol").
    let plan_digest = offer
        .bundle_path
        .rsplit('/')
        .next()
        .and_then(|f| f.strip_suffix(".bundle"))
        .ok_or("the offer's bundle path is not <digest>.bundle")?
        .to_owned();
    let receipt = Receipt {
        device: id.clone(),
        from: "1.0.0".into(),
        to: version.into(),
        result: "committed".into(),
        reason: String::new(),
        bundle: None,
        bundle_digest: Some(plan_digest),
        started_at: 0,
        finished_at: 0,
        resumed_bytes: 0,
        unchanged_bytes: 0,
    };
    let mut doc = receipt.document();
    doc.sign(&key);
    client
        .report(
            &key,
            &Report {
                rollout: offer.rollout,
                event: Event::Committed,
                receipt: Some(doc.to_text()),
            },
        )
        .map_err(|e| e.to_string())?;
    Ok((id, bytes, took))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        let _ = writeln!(
            std::io::stderr(),
            "usage: depot-load enroll URL DEVICES | depot-load rollout URL DEVICES VERSION"
        );
        ExitCode::from(2)
    };
    let (verb, url, devices) = match args.as_slice() {
        [verb, url, devices, ..] => match devices.parse::<usize>() {
            Ok(n) => (verb.as_str(), url.clone(), n),
            Err(_) => return usage(),
        },
        _ => return usage(),
    };
    let mut out = std::io::stdout().lock();
    match verb {
        "enroll" => {
            let client = Client::new(&url, Duration::from_secs(30));
            for n in 0..devices {
                if let Err(e) = poll(&client, &key(n)) {
                    let _ = writeln!(std::io::stderr(), "device {n}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        "rollout" => {
            let Some(version) = args.get(3).cloned() else {
                return usage();
            };
            let started = Instant::now();
            let handles: Vec<_> = (0..devices)
                .map(|n| {
                    let (url, version) = (url.clone(), version.clone());
                    std::thread::spawn(move || device(&url, n, &version))
                })
                .collect();
            let mut failed = false;
            for handle in handles {
                match handle.join().expect("device thread") {
                    Ok((id, bytes, took)) => {
                        let _ = writeln!(
                            out,
                            "device {id} bytes {bytes} download_ms {}",
                            took.as_millis()
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(std::io::stderr(), "a device failed: {e}");
                        failed = true;
                    }
                }
            }
            let _ = writeln!(out, "wall_ms {}", started.elapsed().as_millis());
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => usage(),
    }
}
