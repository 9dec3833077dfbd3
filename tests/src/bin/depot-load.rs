//! Benchmark program: a fleet of simulated devices against an `ota-depot` (tests/bench/depot.sh).
//! Each device has its own key (from a seed), speaks the depot protocol through depot-proto's
//! client, downloads what it is offered (counting and hashing the bytes, writing nothing) and
//! reports a commit with its signed receipt.
//!
//! Usage:
//! - `depot-load enroll URL DEVICES`: each device polls once (enrolls);
//! - `depot-load rollout URL DEVICES VERSION`: every device polls until it is offered the
//!   version, downloads and reports, all at once, one thread per device; prints one line per
//!   device (`device <id> bytes <n> download_ms <t>`) and the total wall time;
//! - `depot-load replay URL DEVICE_KEY RECEIPT ROLLOUT` (tests/fleet/run.sh): a real device's
//!   report of its receipt, made with its key as the device would (accepted: a retry), then
//!   that request captured and sent again, and the same body signed by another key claiming the
//!   device; prints `genuine <status> replayed <status> forged <status>`.

use std::io::{Read, Write};
use std::path::Path;
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

/// Sends a signed request as it was captured: its headers and body unchanged.
fn send(
    url: &str,
    path: &str,
    signed: &depot_proto::auth::Signed,
    body: &str,
) -> Result<u16, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    agent
        .post(format!("{url}{path}"))
        .header(depot_proto::auth::KEY_HEADER, &signed.key)
        .header(depot_proto::auth::NONCE_HEADER, &signed.nonce)
        .header(depot_proto::auth::SIGNATURE_HEADER, &signed.signature)
        .send(body)
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("POST {path}: {e}"))
}

fn fresh_nonce(url: &str) -> Result<String, String> {
    let text = ureq::get(format!("{url}/api/v1/nonce"))
        .call()
        .and_then(|r| r.into_body().read_to_string())
        .map_err(|e| format!("GET /api/v1/nonce: {e}"))?;
    serde_json::from_str::<depot_proto::wire::Nonce>(&text)
        .map(|n| n.nonce)
        .map_err(|e| format!("GET /api/v1/nonce: {e}"))
}

/// `replay`: (genuine, replayed, forged) statuses of one report.
fn replay(url: &str, key: &Path, receipt: &Path, rollout: u64) -> Result<[u16; 3], String> {
    let key = SecretKey::load(key).map_err(|e| e.to_string())?;
    let receipt =
        std::fs::read_to_string(receipt).map_err(|e| format!("{}: {e}", receipt.display()))?;
    let body = serde_json::to_string(&Report {
        rollout,
        event: Event::Committed,
        receipt: Some(receipt),
    })
    .map_err(|e| e.to_string())?;
    let path = "/api/v1/report";
    let captured = depot_proto::auth::sign(&key, "POST", path, &fresh_nonce(url)?, body.as_bytes());
    let genuine = send(url, path, &captured, &body)?;
    let replayed = send(url, path, &captured, &body)?;
    let other = SecretKey::from_seed([0xf0; 32]);
    let mut forged =
        depot_proto::auth::sign(&other, "POST", path, &fresh_nonce(url)?, body.as_bytes());
    forged.key = key.public().to_hex();
    let forged = send(url, path, &forged, &body)?;
    Ok([genuine, replayed, forged])
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        let _ = writeln!(
            std::io::stderr(),
            "usage: depot-load enroll URL DEVICES | depot-load rollout URL DEVICES VERSION \
             | depot-load replay URL DEVICE_KEY RECEIPT ROLLOUT"
        );
        ExitCode::from(2)
    };
    if let [verb, url, key, receipt, rollout] = args.as_slice()
        && verb == "replay"
    {
        let Ok(rollout) = rollout.parse() else {
            return usage();
        };
        return match replay(url, Path::new(key), Path::new(receipt), rollout) {
            Ok([genuine, replayed, forged]) => {
                let _ = writeln!(
                    std::io::stdout(),
                    "genuine {genuine} replayed {replayed} forged {forged}"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "depot-load replay: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
