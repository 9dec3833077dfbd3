//! `ota-depot` as a fleet operator and devices meet it: the real binary on loopback, fake
//! devices speaking the depot protocol with their own keys (the device side proper is the OTA
//! agent's; here a device downloads, checks and reports as a test says).

use std::io::Read;
use std::path::{Path, PathBuf};

use depot_proto::client::{Client, ClientError};
use depot_proto::wire::{Event, MemberState, Poll, Report, RolloutState, Status, WaveState};
use ota_bundle::{PackOptions, Plan, Receipt, SecretKey, Wave};
use tests::depot::Depot;

const PRODUCT: &str = "quote-edge";

fn release_key() -> SecretKey {
    SecretKey::from_seed([41; 32])
}

fn device_key(n: u8) -> SecretKey {
    SecretKey::from_seed([100 + n; 32])
}

/// A depot on loopback trusting the release key, its files in `dir`.
fn start_depot(dir: &Path, extra: &[&str]) -> Depot {
    let keys = dir.join("keys");
    if !keys.exists() {
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(
            keys.join("release.pub"),
            release_key().public().to_line("release"),
        )
        .unwrap();
    }
    Depot::start(&dir.join("data"), &keys, extra)
}

/// A release directory, packed and signed with the release key.
fn bundle(dir: &Path, version: &str, size: usize) -> (PathBuf, String) {
    let rel = dir.join(format!("rel-{version}"));
    std::fs::create_dir_all(rel.join("bin")).unwrap();
    // Incompressible (xorshift), so that the bundle is about as large as `size`.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ version.len() as u64;
    let body: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(rel.join("bin/quote-service"), body).unwrap();
    std::fs::write(rel.join("VERSION"), version).unwrap();
    let out = dir.join(format!("{version}.bundle"));
    let options = PackOptions {
        product: PRODUCT.into(),
        version: version.into(),
        security_version: 1,
        issued_at: 0,
        level: 3,
    };
    ota_bundle::pack(&rel, &out, &options, &release_key(), |_, _| {}).unwrap();
    let file = std::fs::File::open(&out).unwrap();
    let (_, _, digest) = ota_bundle::read_manifest_and_digest_unverified(file).unwrap();
    (out, digest)
}

fn plan_text(digest: &str, version: &str, waves: &str, key: &SecretKey) -> String {
    let waves = waves.split(',').map(|w| Wave::parse(w).unwrap()).collect();
    let plan = Plan::new(PRODUCT, digest, version, waves, 90, 10, 1).unwrap();
    let mut doc = plan.document();
    doc.sign(key);
    doc.to_text()
}

fn receipt(key: &SecretKey, digest: &str, result: &str) -> String {
    let receipt = Receipt {
        device: key.public().id().to_string(),
        from: "1.0.0".into(),
        to: "2.0.0".into(),
        result: result.into(),
        reason: String::new(),
        bundle: Some("2.0.0.bundle".into()),
        bundle_digest: Some(digest.into()),
        started_at: 1,
        finished_at: 2,
        resumed_bytes: 0,
        unchanged_bytes: 0,
    };
    let mut doc = receipt.document();
    doc.sign(key);
    doc.to_text()
}

fn poll(client: &Client, key: &SecretKey, version: &str) -> Option<depot_proto::wire::Offer> {
    client
        .poll(
            key,
            &Poll {
                product: PRODUCT.into(),
                version: version.into(),
            },
        )
        .unwrap()
        .offer
}

fn report(
    client: &Client,
    key: &SecretKey,
    rollout: u64,
    event: Event,
    receipt: Option<String>,
) -> Result<bool, ClientError> {
    client
        .report(
            key,
            &Report {
                rollout,
                event,
                receipt,
            },
        )
        .map(|r| r.recorded)
}

fn download(
    client: &Client,
    offer: &depot_proto::wire::Offer,
    from: u64,
    device: &SecretKey,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    client
        .download(
            &offer.bundle_path,
            from..offer.bundle_size,
            offer.bundle_size,
            Some(&device.public().id().to_string()),
        )
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}

fn publish(depot: &Depot, bundle: &Path, plan: &str) -> u64 {
    let plan_path = bundle.with_extension("plan");
    std::fs::write(&plan_path, plan).unwrap();
    let out = tests::command(Path::new(env!("CARGO_BIN_EXE_ota-depot")))
        .args(["publish", "--depot", &depot.url, "--token-file"])
        .arg(depot.data.join("admin.token"))
        .arg(bundle)
        .arg(&plan_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A depot with `devices` enrolled devices and one rollout of 2.0.0 published in `waves`.
struct Rollout {
    dir: tempfile::TempDir,
    depot: Depot,
    client: Client,
    fleet: Vec<SecretKey>,
    bundle: PathBuf,
    digest: String,
    id: u64,
}

impl Rollout {
    fn start(devices: u8, waves: &str, size: usize) -> Rollout {
        let dir = tempfile::tempdir().unwrap();
        let depot = start_depot(dir.path(), &[]);
        let client = depot.client();
        let fleet: Vec<SecretKey> = (0..devices).map(device_key).collect();
        enroll(&client, &fleet);
        let (bundle, digest) = bundle(dir.path(), "2.0.0", size);
        let id = publish(
            &depot,
            &bundle,
            &plan_text(&digest, "2.0.0", waves, &release_key()),
        );
        Rollout {
            dir,
            depot,
            client,
            fleet,
            bundle,
            digest,
            id,
        }
    }
}

/// `key` reports a commit of rollout `id` of `digest`, with its receipt.
fn commit(client: &Client, key: &SecretKey, id: u64, digest: &str) -> bool {
    let text = receipt(key, digest, "committed");
    report(client, key, id, Event::Committed, Some(text)).unwrap()
}

/// The gate invariant on a status: wave i is open only if the waves before it met 90%.
fn assert_gates_held(status: &Status) {
    for r in &status.rollouts {
        for (i, wave) in r.waves.iter().enumerate().skip(1) {
            if wave.state != WaveState::Waiting {
                let before = &r.waves[..i];
                let size: u32 = before.iter().map(|w| w.size).sum();
                let committed: u32 = before.iter().map(|w| w.committed).sum();
                assert!(
                    committed * 100 >= size * 90,
                    "wave {i} opened early: {r:#?}"
                );
            }
        }
    }
}

fn enroll(client: &Client, fleet: &[SecretKey]) {
    for key in fleet {
        assert_eq!(poll(client, key, "1.0.0"), None);
    }
}

#[test]
fn a_good_release_reaches_every_device_through_waves_that_open_only_on_their_gate() {
    let Rollout {
        dir: _dir,
        depot,
        client,
        fleet,
        bundle,
        digest,
        id,
        ..
    } = Rollout::start(12, "1,25%,100%", 300_000);
    assert_eq!(depot.status().devices, 12);
    let expected = std::fs::read(&bundle).unwrap();

    let mut offered_per_round = Vec::new();
    for _round in 0..5 {
        let offers: Vec<(usize, depot_proto::wire::Offer)> = fleet
            .iter()
            .enumerate()
            .filter_map(|(i, key)| poll(&client, key, "1.0.0").map(|o| (i, o)))
            .collect();
        offered_per_round.push(offers.len());
        if offers.is_empty() {
            break;
        }
        for (i, offer) in offers {
            assert_eq!((offer.rollout, offer.version.as_str()), (id, "2.0.0"));
            // The device checks the plan with its own keys: the depot cannot change it.
            let plan = Plan::verify(
                offer.plan.as_bytes(),
                &ota_bundle::TrustedKeys::new([release_key().public()], 1),
                PRODUCT,
            )
            .unwrap();
            assert_eq!(plan.bundle, digest);
            assert_eq!(download(&client, &offer, 0, &fleet[i]), expected);
            assert!(report(&client, &fleet[i], id, Event::Installing, None).unwrap());
            let text = receipt(&fleet[i], &digest, "committed");
            assert!(report(&client, &fleet[i], id, Event::Committed, Some(text.clone())).unwrap());
            // A retry after a lost answer is not counted twice.
            assert!(!report(&client, &fleet[i], id, Event::Committed, Some(text)).unwrap());
            assert_gates_held(&depot.status());
        }
    }
    // Canary, then the rest of 25% (3 of 12), then everyone else; nothing offered after.
    assert_eq!(offered_per_round, [1, 2, 9, 0]);
    let status = depot.status();
    let rollout = &status.rollouts[0];
    assert_eq!(rollout.state, RolloutState::Completed, "{rollout:#?}");
    assert_eq!(
        rollout
            .waves
            .iter()
            .map(|w| (w.size, w.committed, w.state))
            .collect::<Vec<_>>(),
        [
            (1, 1, WaveState::Done),
            (2, 2, WaveState::Done),
            (9, 9, WaveState::Done)
        ]
    );
    assert!(
        rollout
            .members
            .iter()
            .all(|m| m.state == MemberState::Committed)
    );
    assert_eq!(rollout.bytes_served, 12 * expected.len() as u64);
    assert_eq!(rollout.downloads, 12);
    // The status page shows it, server-rendered.
    let page = ureq::get(&depot.url)
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        page.contains("COMPLETED") && page.contains("quote-edge 2.0.0"),
        "{page}"
    );
}

#[test]
fn a_failed_canary_halts_the_rollout_and_no_other_device_is_offered_a_byte() {
    let Rollout {
        dir,
        depot,
        client,
        fleet,
        digest,
        id,
        ..
    } = Rollout::start(12, "1,25%,100%", 100_000);
    let offers: Vec<usize> = (0..12)
        .filter(|&i| poll(&client, &fleet[i], "1.0.0").is_some())
        .collect();
    let [canary] = offers[..] else {
        panic!("one canary, got {offers:?}")
    };
    let offer = poll(&client, &fleet[canary], "1.0.0").unwrap();
    let served = download(&client, &offer, 0, &fleet[canary]).len() as u64;
    assert!(
        report(
            &client,
            &fleet[canary],
            id,
            Event::RolledBack,
            Some(receipt(&fleet[canary], &digest, "rolled_back"))
        )
        .unwrap()
    );

    let status = depot.status();
    let rollout = &status.rollouts[0];
    assert_eq!(rollout.state, RolloutState::Halted);
    assert_eq!(
        rollout.reason.as_deref(),
        Some("1 of 1 reports failed, over the error threshold of 10%")
    );
    for (i, key) in fleet.iter().enumerate() {
        assert_eq!(
            poll(&client, key, "1.0.0"),
            None,
            "device {i} offered a halted rollout"
        );
    }
    let status = depot.status();
    assert_eq!(
        (
            status.rollouts[0].bytes_served,
            status.rollouts[0].downloads
        ),
        (served, 1)
    );
    // Another rollout cannot start while this one is halted; resuming counts only new reports.
    let (next, next_digest) = self::bundle(dir.path(), "2.0.1", 1000);
    let accepted = depot.admin().upload_bundle(&next).unwrap();
    assert_eq!(accepted.digest, next_digest);
    let refused = depot
        .admin()
        .publish_plan(plan_text(&next_digest, "2.0.1", "100%", &release_key()).as_bytes())
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { status: 409, error, .. } if error.contains("abort it")),
        "{refused}"
    );
    assert_eq!(
        depot.admin().control(id, "resume").unwrap().state,
        RolloutState::Running
    );
    assert!(matches!(
        depot.admin().control(id, "resume").unwrap_err(),
        ClientError::Refused { status: 409, .. }
    ));
    assert_eq!(
        depot.admin().control(id, "abort").unwrap().state,
        RolloutState::Aborted
    );
    for key in &fleet {
        assert_eq!(poll(&client, key, "1.0.0"), None);
    }
    let next_id = depot
        .admin()
        .publish_plan(plan_text(&next_digest, "2.0.1", "100%", &release_key()).as_bytes())
        .unwrap()
        .id;
    assert!(next_id > id);
}

#[test]
fn a_tampered_bundle_or_plan_is_refused_at_publish_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let depot = start_depot(dir.path(), &["--max-bundle-size", "200KiB"]);
    let admin = depot.admin();
    let (bundle, digest) = bundle(dir.path(), "2.0.0", 100_000);
    let good = std::fs::read(&bundle).unwrap();
    // A byte flipped in the payload, then in the signature.
    for at in [good.len() - 10, 40] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        let path = dir.path().join("bad.bundle");
        std::fs::write(&path, &bad).unwrap();
        let (status, error) = refused(admin.upload_bundle(&path));
        assert_eq!(status, 422, "{error}");
        assert!(error.starts_with("the bundle is refused"), "{error}");
    }
    // Cut short.
    let path = dir.path().join("short.bundle");
    std::fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert_eq!(refused(admin.upload_bundle(&path)).0, 422);
    // Over the limit.
    let (big, _) = self::bundle(dir.path(), "9.9.9", 400_000);
    let mut noise = std::fs::read(&big).unwrap();
    noise.extend(std::iter::repeat_n(0u8, 300_000));
    std::fs::write(&big, noise).unwrap();
    assert_eq!(refused(admin.upload_bundle(&big)).0, 413);
    // Without the token, or with another one.
    assert_eq!(refused(depot.client().upload_bundle(&bundle)).0, 401);
    assert_eq!(
        refused(
            depot
                .client()
                .with_token("0".repeat(64))
                .upload_bundle(&bundle)
        )
        .0,
        401
    );
    assert!(
        std::fs::read_dir(depot.data.join("bundles"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(
        std::fs::read_dir(depot.data.join("incoming"))
            .unwrap()
            .next()
            .is_none(),
        "uploads are cleaned up"
    );

    // A plan for a bundle the depot does not hold, then signed by another key, then edited.
    let plan = plan_text(&digest, "2.0.0", "1,100%", &release_key());
    assert_eq!(refused(admin.publish_plan(plan.as_bytes())).0, 404);
    admin.upload_bundle(&bundle).unwrap();
    let foreign = plan_text(&digest, "2.0.0", "1,100%", &SecretKey::from_seed([9; 32]));
    let (status, error) = refused(admin.publish_plan(foreign.as_bytes()));
    assert_eq!(status, 422);
    assert!(error.contains("signed by 0 of the trusted keys"), "{error}");
    let edited = plan.replace("\"success_threshold\":90", "\"success_threshold\":1");
    assert_ne!(edited, plan);
    assert_eq!(refused(admin.publish_plan(edited.as_bytes())).0, 422);
    assert_eq!(refused(depot.client().publish_plan(plan.as_bytes())).0, 401);
    assert!(depot.status().rollouts.is_empty());
    // The good one goes through, once.
    admin.publish_plan(plan.as_bytes()).unwrap();
    assert_eq!(refused(admin.publish_plan(plan.as_bytes())).0, 409);
}

fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Refused { status, error, .. }) => (status, error),
        other => panic!("not refused: {other:?}"),
    }
}

/// Sends one signed request by hand, returning its status and the headers it carried.
fn signed_post(
    url: &str,
    path: &str,
    key: &SecretKey,
    body: &str,
) -> (u16, depot_proto::auth::Signed) {
    let nonce: depot_proto::wire::Nonce = serde_json::from_str(
        &ureq::get(format!("{url}/api/v1/nonce"))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    let signed = depot_proto::auth::sign(key, "POST", path, &nonce.nonce, body.as_bytes());
    (send(url, path, &signed, body), signed)
}

fn send(url: &str, path: &str, signed: &depot_proto::auth::Signed, body: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    agent
        .post(format!("{url}{path}"))
        .header(depot_proto::auth::KEY_HEADER, &signed.key)
        .header(depot_proto::auth::NONCE_HEADER, &signed.nonce)
        .header(depot_proto::auth::SIGNATURE_HEADER, &signed.signature)
        .send(body)
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn replayed_forged_unsigned_and_foreign_reports_are_refused() {
    let Rollout {
        dir: _dir,
        depot,
        client,
        fleet,
        digest,
        id,
        ..
    } = Rollout::start(3, "100%", 10_000);
    let key = &fleet[0];
    assert!(poll(&client, key, "1.0.0").is_some());

    // A report captured on the wire and sent again: the nonce is spent.
    let body = serde_json::to_string(&Report {
        rollout: id,
        event: Event::Installing,
        receipt: None,
    })
    .unwrap();
    let (status, captured) = signed_post(&depot.url, "/api/v1/report", key, &body);
    assert_eq!(status, 200);
    assert_eq!(
        send(&depot.url, "/api/v1/report", &captured, &body),
        401,
        "replayed"
    );
    // Unsigned, and signed by another key claiming this device's key.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let unsigned = agent
        .post(format!("{}/api/v1/report", depot.url))
        .send(&body)
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);
    let (_, mut forged) = signed_post(
        &depot.url,
        "/api/v1/poll",
        &SecretKey::from_seed([1; 32]),
        "{}",
    );
    forged.key = key.public().to_hex();
    let fresh: depot_proto::wire::Nonce = serde_json::from_str(
        &ureq::get(format!("{}/api/v1/nonce", depot.url))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    forged.nonce = fresh.nonce;
    assert_eq!(
        send(&depot.url, "/api/v1/report", &forged, &body),
        401,
        "forged"
    );

    // A terminal report without a receipt, with another device's receipt, with a receipt for
    // another bundle, or whose receipt says something else: refused, nothing recorded.
    let cases = [
        (Event::Committed, None),
        (
            Event::Committed,
            Some(receipt(&fleet[1], &digest, "committed")),
        ),
        (
            Event::Committed,
            Some(receipt(key, &"0".repeat(64), "committed")),
        ),
        (Event::Committed, Some(receipt(key, &digest, "rolled_back"))),
    ];
    for (event, text) in cases {
        let error = report(&client, key, id, event, text).unwrap_err();
        assert!(
            matches!(error, ClientError::Refused { status: 422, .. }),
            "{error}"
        );
    }
    let members = &depot.status().rollouts[0].members;
    assert!(
        members
            .iter()
            .all(|m| !matches!(m.state, MemberState::Committed | MemberState::RolledBack))
    );
    // An outcome cannot be changed afterwards.
    assert!(
        report(
            &client,
            key,
            id,
            Event::Committed,
            Some(receipt(key, &digest, "committed"))
        )
        .unwrap()
    );
    let error = report(
        &client,
        key,
        id,
        Event::RolledBack,
        Some(receipt(key, &digest, "rolled_back")),
    )
    .unwrap_err();
    assert!(
        matches!(error, ClientError::Refused { status: 409, .. }),
        "{error}"
    );
}

#[test]
fn only_allow_listed_devices_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("devices");
    std::fs::write(
        &list,
        format!(
            "# the fleet\n{}",
            device_key(0).public().to_line("device 0")
        ),
    )
    .unwrap();
    let depot = start_depot(dir.path(), &["--devices", list.to_str().unwrap()]);
    let client = depot.client();
    assert_eq!(poll(&client, &device_key(0), "1.0.0"), None);
    let error = client
        .poll(
            &device_key(1),
            &Poll {
                product: PRODUCT.into(),
                version: "1.0.0".into(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Refused { status: 403, error, .. } if error.contains("allow-list")),
        "{error}"
    );
    assert_eq!(depot.status().devices, 1);
    drop(depot);
    // A typo in the list names the line.
    std::fs::write(&list, "ed25519 nothex\n").unwrap();
    let out = tests::command(Path::new(env!("CARGO_BIN_EXE_ota-depot")))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--trusted-keys")
        .arg(dir.path().join("keys"))
        .arg("--devices")
        .arg(&list)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(depot_proto::exit::CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1: not a device key line"), "{stderr}");
}

#[test]
fn an_interrupted_download_resumes_from_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let depot = start_depot(dir.path(), &[]);
    let client = depot.client();
    let key = device_key(0);
    enroll(&client, std::slice::from_ref(&key));
    let (bundle, digest) = bundle(dir.path(), "2.0.0", 200_000);
    publish(
        &depot,
        &bundle,
        &plan_text(&digest, "2.0.0", "100%", &release_key()),
    );
    let offer = poll(&client, &key, "1.0.0").unwrap();
    let expected = std::fs::read(&bundle).unwrap();
    // The first part, then the connection drops.
    let mut head = vec![0u8; 50_000];
    client
        .download(
            &offer.bundle_path,
            0..offer.bundle_size,
            offer.bundle_size,
            None,
        )
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    let tail = download(&client, &offer, head.len() as u64, &key);
    assert_eq!(tail.len(), expected.len() - head.len());
    head.extend(tail);
    assert_eq!(head, expected);
    let rollout = &depot.status().rollouts[0];
    assert_eq!(rollout.downloads, 2);
    // A part in the middle is exactly those bytes.
    let mut part = Vec::new();
    client
        .download(&offer.bundle_path, 1000..5000, offer.bundle_size, None)
        .unwrap()
        .read_to_end(&mut part)
        .unwrap();
    assert_eq!(part, expected[1000..5000]);
    // A range past the end is refused by the depot (416), never answered with the whole file.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let past = agent
        .get(format!("{}{}", depot.url, offer.bundle_path))
        .header("range", format!("bytes={}-", offer.bundle_size + 5))
        .call()
        .unwrap();
    assert_eq!(past.status().as_u16(), 416);
    assert!(
        client
            .download(
                &offer.bundle_path,
                0..offer.bundle_size + 1,
                offer.bundle_size,
                None
            )
            .is_err()
    );
}

#[test]
fn a_depot_killed_mid_rollout_restarts_with_every_report_and_decision() {
    let Rollout {
        dir,
        depot,
        client,
        fleet,
        digest,
        id,
        ..
    } = Rollout::start(12, "1,25%,100%", 10_000);
    // The canary commits: wave 1 opens; one of wave 1 commits too.
    let mut committed = 0;
    for _ in 0..2 {
        let next = (0..12)
            .find(|&i| poll(&client, &fleet[i], "1.0.0").is_some())
            .unwrap();
        assert!(commit(&client, &fleet[next], id, &digest));
        committed += 1;
    }
    let before = depot.status();
    assert_eq!(before.rollouts[0].waves[1].state, WaveState::Open);
    depot.kill();

    let depot = start_depot(dir.path(), &[]);
    let after = depot.status();
    let shape = |s: &Status| {
        s.rollouts
            .iter()
            .map(|r| {
                (
                    r.id,
                    r.state,
                    r.waves.clone(),
                    r.members
                        .iter()
                        .filter(|m| m.state == MemberState::Committed)
                        .count(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&after), shape(&before));
    assert_eq!(shape(&after)[0].3, committed);
    assert_eq!(after.devices, 12);
    // It continues: the last of wave 1 commits and wave 2 opens.
    let client = depot.client();
    let next = (0..12)
        .find(|&i| poll(&client, &fleet[i], "1.0.0").is_some())
        .unwrap();
    assert!(commit(&client, &fleet[next], id, &digest));
    let offered = (0..12)
        .filter(|&i| poll(&client, &fleet[i], "1.0.0").is_some())
        .count();
    assert_eq!(offered, 9);
}

#[test]
fn a_device_that_already_runs_the_version_counts_as_committed_without_a_download() {
    let Rollout {
        dir: _dir,
        depot,
        client,
        fleet,
        ..
    } = Rollout::start(2, "100%", 1000);
    // Updated from a stick meanwhile: its signed poll says it runs 2.0.0.
    assert_eq!(poll(&client, &fleet[0], "2.0.0"), None);
    assert!(poll(&client, &fleet[1], "1.0.0").is_some());
    let rollout = &depot.status().rollouts[0];
    let state = |key: &SecretKey| {
        let id = key.public().id().to_string();
        rollout
            .members
            .iter()
            .find(|m| m.device == id)
            .unwrap()
            .state
    };
    assert_eq!(
        (state(&fleet[0]), state(&fleet[1])),
        (MemberState::Committed, MemberState::Offered)
    );
    assert_eq!((rollout.waves[0].committed, rollout.downloads), (1, 0));
}

/// Runs `program` with `args`, or says why it cannot (not installed).
fn tool(program: &str, args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    match std::process::Command::new(program).args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tests::skip(&format!(
                "{program} is not installed (.ci/packages.txt has it)"
            ));
            None
        }
        Err(e) => panic!("{program}: {e}"),
    }
}

#[test]
fn the_status_page_shows_a_halted_rollout_in_a_browser() {
    let Rollout {
        dir,
        depot,
        client,
        fleet,
        digest,
        id,
        ..
    } = Rollout::start(3, "1,100%", 1000);
    let canary = (0..3)
        .find(|&i| poll(&client, &fleet[i], "1.0.0").is_some())
        .unwrap();
    let text = receipt(&fleet[canary], &digest, "rolled_back");
    assert!(report(&client, &fleet[canary], id, Event::RolledBack, Some(text)).unwrap());
    // A real browser renders the page (headless Chromium, a screenshot), and the text is read
    // back from the pixels (Tesseract): what an operator sees, not what the HTML says.
    let png = dir.path().join("page.png");
    let profile = dir.path().join("chromium");
    let screenshot = format!("--screenshot={}", png.display());
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let words = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1200,900",
        &profile_arg,
        &screenshot,
        &depot.url,
    ];
    let args: Vec<&std::ffi::OsStr> = words.iter().map(std::ffi::OsStr::new).collect();
    let Some(out) = tool("chromium", &args) else {
        return;
    };
    assert!(
        png.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let Some(out) = tool("tesseract", &[png.as_os_str(), std::ffi::OsStr::new("-")]) else {
        return;
    };
    let seen = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "quote-edge depot",
        "Devices enrolled: 3",
        "quote-edge 2.0.0",
        "HALTED",
        "1 of 1 reports failed",
    ] {
        assert!(seen.contains(expected), "{expected:?} not seen in:\n{seen}");
    }
}
