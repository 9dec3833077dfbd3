//! The OTA agent inside the supervisor, end to end on loopback: real quote-service replicas,
//! bundles packed and signed here, a rolling replacement under client load, the trial, commit,
//! and rollbacks (a release that crashes, a failed health command) with the database restored.
//!
//! A release here is a directory whose `bin/quote-service` is a small script that starts the
//! workspace's quote-service (through the emulator when the tests run under one), or that
//! fails: the bundle carries the script, the agent installs and runs it like any release.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use edge_proto::{ExitReason, ReplicaState, Reply, Request, Status, UpdateOutcome, UpdateState};
use ota_bundle::{PackOptions, SecretKey, pack};

use crate::supervisor::{Supervisor, get, request};

pub(crate) const GOOD: &str = "good";
pub(crate) const CRASHES: &str = "crashes";

/// A release directory: `bin/quote-service` that serves, or that exits 3 at once.
pub(crate) fn release(dir: &Path, kind: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let body = match kind {
        GOOD => {
            let (program, args) = tests::service_command(&tests::workspace_binary("quote-service"));
            let words: Vec<String> = std::iter::once(program)
                .chain(args)
                .map(|w| format!("'{w}'"))
                .collect();
            format!("exec {} \"$@\"\n", words.join(" "))
        }
        _ => "echo 'this release cannot start' >&2\nexit 3\n".to_owned(),
    };
    let script = bin.join("quote-service");
    // The release's name in the script: every release differs in this one file.
    let name = dir.file_name().unwrap().to_string_lossy();
    std::fs::write(&script, format!("#!/bin/sh\n# {name}\n{body}")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.to_owned()
}

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) key: SecretKey,
}

impl Fixture {
    pub(crate) fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([7; 32]);
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(
            dir.path().join("keys/release.pub"),
            key.public().to_line("test"),
        )
        .unwrap();
        release(&dir.path().join("factory"), GOOD);
        Fixture { dir, key }
    }

    /// The supervisor's configuration: the factory release and trusted keys of this fixture.
    pub(crate) fn config(&self, ota: &str) -> String {
        format!(
            "trusted_keys = {:?}\n[service]\ncommand = \"quote-service\"\nstop_grace = \"2s\"\n\
             [ota]\nfactory_bin = {:?}\nscan_interval = \"100ms\"\ntrial_deadline = \"90s\"\n{ota}",
            self.dir.path().join("keys"),
            self.dir.path().join("factory/bin"),
        )
    }

    pub(crate) fn bundle(
        &self,
        kind: &str,
        version: &str,
        security_version: u64,
        product: &str,
    ) -> PathBuf {
        self.bundle_with_data(kind, version, security_version, product, 0)
    }

    /// As [`Fixture::bundle`], with `share/data.bin` of `data` bytes (half compressible).
    pub(crate) fn bundle_with_data(
        &self,
        kind: &str,
        version: &str,
        security_version: u64,
        product: &str,
        data: usize,
    ) -> PathBuf {
        let name = format!("{kind}-{version}-{product}");
        let rel = release(&self.dir.path().join(&name), kind);
        if data > 0 {
            std::fs::create_dir_all(rel.join("share")).unwrap();
            let bytes: Vec<u8> = (0..data as u32)
                .map(|i| {
                    if (i / 4096) % 2 == 0 {
                        (i.wrapping_mul(2_654_435_761) >> 13) as u8
                    } else {
                        b'q'
                    }
                })
                .collect();
            std::fs::write(rel.join("share/data.bin"), bytes).unwrap();
        }
        let out = self.dir.path().join(format!("{name}.bundle"));
        let options = PackOptions {
            product: product.into(),
            version: version.into(),
            security_version,
            issued_at: 1_000 + security_version,
            level: 3,
        };
        pack(&rel, &out, &options, &self.key, |_, _| {}).unwrap();
        out
    }

    /// A delta of a good release with `data` bytes of data (as [`Fixture::bundle_with_data`])
    /// against the release in `base`.
    pub(crate) fn delta(
        &self,
        version: &str,
        security_version: u64,
        data: usize,
        base: &Path,
    ) -> PathBuf {
        let full = self.bundle_with_data(GOOD, version, security_version, "quote-edge", data);
        let rel = self.dir.path().join(format!("{GOOD}-{version}-quote-edge"));
        let out = full.with_extension("delta.bundle");
        let (base, _) =
            ota_bundle::read_manifest_unverified(std::fs::File::open(base).unwrap()).unwrap();
        let options = PackOptions {
            product: "quote-edge".into(),
            version: version.into(),
            security_version,
            issued_at: 1_000 + security_version,
            level: 3,
        };
        ota_bundle::pack_delta(&rel, &out, &options, &self.key, &base, |_, _| {}).unwrap();
        out
    }
}

async fn apply(sup: &Supervisor, bundle: &Path) {
    match sup
        .ask(Request::Apply {
            bundle: bundle.display().to_string(),
        })
        .await
    {
        Reply::Accepted { .. } => {}
        other => panic!("apply refused: {other:?}"),
    }
}

/// Applies `bundle` and waits for its refusal; returns the status and the reason.
async fn refused(sup: &Supervisor, bundle: &Path) -> (Status, String) {
    apply(sup, bundle).await;
    let after = sup
        .wait_for("the refusal", |s| {
            s.update.state == UpdateState::Idle
                && s.update
                    .last_result
                    .as_ref()
                    .is_some_and(|r| r.result == UpdateOutcome::Refused)
        })
        .await;
    let reason = after.update.last_result.clone().unwrap().reason.unwrap();
    (after, reason)
}

/// Waits for the update to end (the agent idle with a result for `version`).
pub(crate) async fn finished(sup: &Supervisor, version: &str) -> Status {
    sup.wait_for(&format!("the update to {version} to end"), |s| {
        s.update.state == UpdateState::Idle
            && s.update
                .last_result
                .as_ref()
                .is_some_and(|r| r.version.contains(version))
    })
    .await
}

pub(crate) async fn post(sup: &Supervisor, text: &str) -> String {
    let (status, _, body) = request(
        sup.addr,
        "POST",
        "/quotes",
        &format!(r#"{{"text":"{text}","author":"Update test"}}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    body.split("\"id\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .unwrap()
        .to_owned()
}

/// A client that asks for quotes until stopped; returns (requests, failures).
fn client_loop(sup: &Supervisor) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(u32, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = sup.addr;
    let flag = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let (mut n, mut failures) = (0, Vec::new());
        while !flag.load(Ordering::SeqCst) {
            match get(addr, "/quotes/random").await {
                Ok((200, _, _)) => {}
                other => failures.push(format!("{other:?}")),
            }
            n += 1;
        }
        (n, failures)
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_bundle_is_rolled_out_one_replica_at_a_time_under_load_and_committed() {
    let fx = Fixture::new();
    let config = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}",
        fx.config("trial = \"1s\"\n")
    );
    let sup = Supervisor::start(3, &config).await;
    sup.all_ready(3).await;
    let kept = post(&sup, "Written before the update").await;
    let (stop, client) = client_loop(&sup);
    let bundle = fx.bundle(GOOD, "2.0.0", 2, "quote-edge");
    apply(&sup, &bundle).await;
    let least_ready = AtomicU32::new(u32::MAX);
    let most_replicas = AtomicU32::new(0);
    let done = sup
        .wait_for("the update to commit", |s| {
            least_ready.fetch_min(s.ready, Ordering::SeqCst);
            // Replicas on their way out (stopping) do not count, as terminating pods do not
            // count towards Kubernetes' maxSurge.
            let live = s
                .replicas
                .iter()
                .filter(|r| r.state != ReplicaState::Stopping)
                .count();
            most_replicas.fetch_max(live as u32, Ordering::SeqCst);
            s.update.state == UpdateState::Idle && s.update.last_result.is_some()
        })
        .await;
    stop.store(true, Ordering::SeqCst);
    let (requests, failures) = client.await.unwrap();
    let result = done.update.last_result.clone().unwrap();
    assert_eq!(
        (result.result.as_str(), result.version.as_str()),
        ("committed", "2.0.0"),
        "{done:#?}"
    );
    assert_eq!(done.update.version, "2.0.0");
    assert_eq!(done.update.security_version, 2);
    assert!(
        done.replicas
            .iter()
            .all(|r| r.release.as_deref() == Some("2.0.0") && r.ready),
        "{done:#?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:?}",
        failures.len()
    );
    assert!(requests > 0);
    assert!(
        least_ready.load(Ordering::SeqCst) >= 2,
        "fewer than N-1 ready during the rollout"
    );
    assert_eq!(
        most_replicas.load(Ordering::SeqCst),
        4,
        "one surge replica at a time"
    );
    let (status, _, _) = get(sup.addr, &format!("/quotes/{kept}")).await.unwrap();
    assert_eq!(status, 200, "the data survives the update");
    let (_, _, metrics) = get(sup.admin.unwrap(), "/metrics").await.unwrap();
    for line in [
        "edge_supervisor_update_results_total{result=\"committed\"} 1",
        "edge_supervisor_security_version 2",
        "edge_supervisor_update_in_progress 0",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    // The receipt verifies against the device's enrolled key (as a fleet would check the ones
    // a stick brings back), and a changed one does not.
    let devices = fx.dir.path().join("devices");
    std::fs::create_dir(&devices).unwrap();
    let enroll = tests::command(&tests::workspace_binary("edge-supervisor"))
        .args(["device-key", "--data-dir"])
        .arg(sup.data_dir())
        .output()
        .unwrap();
    assert!(enroll.status.success(), "{enroll:?}");
    std::fs::write(devices.join("device.pub"), &enroll.stdout).unwrap();
    let receipts: Vec<PathBuf> = std::fs::read_dir(sup.data_dir().join("ota/receipts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let verify = |files: &[PathBuf]| {
        tests::command(&tests::workspace_binary("ota"))
            .args(["receipt", "verify", "--device-keys"])
            .arg(&devices)
            .args(files)
            .output()
            .unwrap()
    };
    let out = verify(&receipts);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {out:?}");
    assert!(
        stdout.contains("committed factory -> 2.0.0 (bundle "),
        "{stdout}"
    );
    let forged = fx.dir.path().join("forged.receipt");
    let text = std::fs::read_to_string(&receipts[0]).unwrap();
    std::fs::write(&forged, text.replace("\"2.0.0\"", "\"2.0.1\"")).unwrap();
    let out = verify(&[forged]);
    assert_eq!(
        out.status.code(),
        Some(edge_proto::exit::REFUSED),
        "{out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED"));

    // A lower security version is refused, as is another product; nothing changes.
    for (bundle, why) in [
        (
            fx.bundle(GOOD, "1.9.0", 1, "quote-edge"),
            "downgrade refused",
        ),
        (fx.bundle(GOOD, "3.0.0", 3, "other-product"), "product"),
    ] {
        let (after, reason) = refused(&sup, &bundle).await;
        assert!(reason.contains(why), "{reason}");
        assert_eq!(after.update.version, "2.0.0");
    }
    // Damaged copies of a good release: truncated or with bytes appended, refused before the
    // slot is touched; a flipped byte in the payload, refused at its chunk (the slot emptied).
    // None of them is held against the release: an intact copy then installs.
    let intact = fx.bundle(GOOD, "3.1.0", 3, "quote-edge");
    let bytes = std::fs::read(&intact).unwrap();
    let damaged = |name: &str, bytes: &[u8]| {
        let path = intact.with_file_name(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let truncated = damaged("truncated.bundle", &bytes[..bytes.len() - 1]);
    let appended = damaged("appended.bundle", &[&bytes[..], b"x"].concat());
    for copy in [truncated, appended] {
        let (after, reason) = refused(&sup, &copy).await;
        assert!(
            reason.contains("a damaged or incomplete copy")
                && reason.contains("nothing was written"),
            "{reason}"
        );
        assert_eq!(after.update.version, "2.0.0");
    }
    let mut flipped = bytes.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x40;
    let flipped = damaged("flipped.bundle", &flipped);
    apply(&sup, &flipped).await;
    let after = finished(&sup, "3.1.0").await;
    let result = after.update.last_result.unwrap();
    assert_eq!(result.result, UpdateOutcome::InstallFailed, "{result:?}");
    assert!(
        result
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("another copy of it may be installed"),
        "{result:?}"
    );
    assert_eq!(after.update.version, "2.0.0");
    assert_eq!(after.ready, 3);
    apply(&sup, &intact).await;
    let after = finished(&sup, "3.1.0").await;
    let result = after.update.last_result.unwrap();
    assert_eq!(result.result, UpdateOutcome::Committed, "{result:?}");
    assert_eq!(after.update.version, "3.1.0");
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_crashes_is_rolled_back_from_the_inbox_and_not_retried() {
    let fx = Fixture::new();
    let sup = Supervisor::start(3, &fx.config("trial = \"1s\"\n")).await;
    sup.all_ready(3).await;
    let kept = post(&sup, "Written before the bad update").await;
    let inbox = sup.data_dir().join("ota/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let bundle = fx.bundle(CRASHES, "2.0.0", 2, "quote-edge");
    std::fs::copy(&bundle, inbox.join("update.bundle")).unwrap();
    let after = finished(&sup, "2.0.0").await;
    let result = after.update.last_result.clone().unwrap();
    assert_eq!(result.result, UpdateOutcome::RolledBack, "{after:#?}");
    assert!(
        result
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("exited with code 3"),
        "{result:?}"
    );
    let after = sup.all_ready(3).await;
    assert_eq!(after.update.version, "factory");
    assert!(
        after
            .replicas
            .iter()
            .all(|r| r.release.as_deref() == Some("factory"))
    );
    let (status, _, _) = get(sup.addr, &format!("/quotes/{kept}")).await.unwrap();
    assert_eq!(status, 200, "quotes intact after the rollback");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sup.data_dir().join("ota/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["failed_bundles"].as_array().unwrap().len(),
        1,
        "{state}"
    );
    assert!(
        std::fs::read_dir(inbox.join("receipts")).unwrap().count() >= 1,
        "a receipt goes back next to the bundle"
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_command_rolls_back_restores_the_database_and_exports_the_trial_quotes() {
    let fx = Fixture::new();
    let sup = Supervisor::start(
        2,
        &fx.config("trial = \"3s\"\nhealth_commands = [[\"/bin/sh\", \"-c\", \"exit 7\"]]\n"),
    )
    .await;
    sup.all_ready(2).await;
    let kept = post(&sup, "Written before the trial").await;
    apply(&sup, &fx.bundle(GOOD, "2.0.0", 2, "quote-edge")).await;
    sup.wait_for("the trial", |s| s.update.state == UpdateState::Trial)
        .await;
    let during = post(&sup, "Written during the trial").await;
    let after = finished(&sup, "2.0.0").await;
    let result = after.update.last_result.clone().unwrap();
    assert_eq!(result.result, UpdateOutcome::RolledBack, "{after:#?}");
    assert!(result.reason.unwrap().contains("health command"));
    sup.all_ready(2).await;
    let (status, _, _) = get(sup.addr, &format!("/quotes/{kept}")).await.unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = get(sup.addr, &format!("/quotes/{during}")).await.unwrap();
    assert_eq!(status, 404, "the database is the snapshot again");
    let exported: String = std::fs::read_dir(sup.data_dir().join("ota/rollback"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        exported.contains("Written during the trial"),
        "{exported:?}"
    );
    assert!(!exported.contains("Written before the trial"));
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modified_program_in_a_slot_is_refused_and_reported_not_run() {
    let fx = Fixture::new();
    let sup = Supervisor::start(1, &fx.config("trial = \"300ms\"\n")).await;
    sup.all_ready(1).await;
    apply(&sup, &fx.bundle(GOOD, "2.0.0", 2, "quote-edge")).await;
    let done = finished(&sup, "2.0.0").await;
    assert_eq!(
        done.update.last_result.unwrap().result,
        UpdateOutcome::Committed
    );
    // Someone with the data partition in hand changes the slot's programs (one byte more).
    let slot = done.update.slot.expect("running from a slot");
    let bin = sup.data_dir().join("ota/slots").join(&slot).join("bin");
    for entry in std::fs::read_dir(&bin).unwrap() {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(entry.unwrap().path())
            .unwrap();
        file.write_all(b"\0").unwrap();
    }
    // The replica's next start is refused, and says why; nothing from the slot runs.
    let pid = done.replicas[0].pid.unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let refused = sup
        .wait_for("the restart to be refused", |s| {
            s.replicas[0].last_exit.as_ref().is_some_and(|e| {
                e.reason == ExitReason::SpawnFailed
                    && e.detail.as_deref().unwrap_or("").contains("may not run")
            })
        })
        .await;
    let detail = refused.replicas[0]
        .last_exit
        .clone()
        .unwrap()
        .detail
        .unwrap();
    assert!(
        detail.contains(&format!("slot {slot} may not run")) && detail.contains("bin/"),
        "{detail}"
    );
    assert_eq!(refused.ready, 0);
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ota_apply_follows_the_update_to_its_commit_and_ota_status_reports_it() {
    let fx = Fixture::new();
    let sup = Supervisor::start(2, &fx.config("trial = \"1s\"\n")).await;
    sup.all_ready(2).await;
    let bundle = fx.bundle(GOOD, "2.1.0", 2, "quote-edge");
    let socket = sup.data_dir().join("supervisor.sock");
    let ota = tests::workspace_binary("ota");
    let output = {
        let (socket, ota) = (socket.clone(), ota.clone());
        tokio::task::spawn_blocking(move || {
            tests::command(&ota)
                .args(["apply", "--json", "--socket"])
                .arg(&socket)
                .arg(&bundle)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["last_result"]["result"], "committed", "{stdout}");
    assert!(
        lines.iter().any(|l| l["state"] == "trial"),
        "the trial is reported on the way: {stdout}"
    );
    let status = tokio::task::spawn_blocking(move || {
        tests::command(&ota)
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let update: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(update["version"], "2.1.0");
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_copies_unchanged_chunks_from_the_running_release_and_needs_that_base() {
    let fx = Fixture::new();
    let sup = Supervisor::start(2, &fx.config("trial = \"500ms\"\n")).await;
    sup.all_ready(2).await;
    let data = 3 << 20;
    let v2 = fx.bundle_with_data(GOOD, "2.0.0", 2, "quote-edge", data);
    apply(&sup, &v2).await;
    assert_eq!(finished(&sup, "2.0.0").await.update.version, "2.0.0");

    // 3.0.0 changes only its script: the data's chunks are copied, not carried.
    let delta = fx.delta("3.0.0", 3, data, &v2);
    let full = fx.dir.path().join("good-3.0.0-quote-edge.bundle");
    let (delta_len, full_len) = (
        std::fs::metadata(&delta).unwrap().len(),
        std::fs::metadata(&full).unwrap().len(),
    );
    assert!(
        delta_len * 10 < full_len,
        "delta {delta_len} bytes, full {full_len}"
    );
    apply(&sup, &delta).await;
    let after = finished(&sup, "3.0.0").await;
    let result = after.update.last_result.clone().unwrap();
    assert_eq!(result.result, UpdateOutcome::Committed, "{result:?}");
    assert_eq!(after.update.slot.as_deref(), Some("b"));
    let release = fx.dir.path().join("good-3.0.0-quote-edge");
    for file in ["bin/quote-service", "share/data.bin"] {
        assert_eq!(
            std::fs::read(sup.data_dir().join("ota/slots/b").join(file)).unwrap(),
            std::fs::read(release.join(file)).unwrap(),
            "{file} byte for byte"
        );
    }

    // A delta against 2.0.0 no longer applies: 3.0.0 runs.
    let stale = fx.delta("3.1.0", 4, data, &v2);
    let (_, reason) = refused(&sup, &stale).await;
    assert!(
        reason.contains("use the full bundle") && reason.contains("3.0.0"),
        "{reason}"
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_offline_and_a_permit_allows_one_downgrade_on_one_device_once() {
    let fx = Fixture::new();
    let sup = Supervisor::start(1, &fx.config("trial = \"300ms\"\n")).await;
    sup.all_ready(1).await;
    apply(&sup, &fx.bundle(GOOD, "2.0.0", 2, "quote-edge")).await;
    finished(&sup, "2.0.0").await;

    // Set 1 trusts only key B; key A (the factory's) signs it, and is thereby revoked.
    let b = SecretKey::from_seed([8; 32]);
    let mut set = ota_bundle::KeySet::document("quote-edge", 1, 1, &[b.public()]).unwrap();
    set.sign(&fx.key);
    // And by the new key itself: a set must prove its own keys are held.
    set.sign(&b);
    let inbox = sup.data_dir().join("ota/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(inbox.join("rotate.keyset"), set.to_text()).unwrap();
    let kept = sup.data_dir().join("ota/keysets/1.keyset");
    sup.wait_for("the key set to be accepted", |_| kept.exists())
        .await;

    let by_a = fx.bundle(GOOD, "3.0.0", 3, "quote-edge");
    let (_, reason) = refused(&sup, &by_a).await;
    assert!(
        reason.contains("signed by 0 of the trusted keys"),
        "{reason}"
    );
    let by_b = fx.dir.path().join("by-b.bundle");
    let release = fx.dir.path().join("good-3.0.0-quote-edge");
    let options = |version: &str, sv: u64| PackOptions {
        product: "quote-edge".into(),
        version: version.into(),
        security_version: sv,
        issued_at: 2_000,
        level: 3,
    };
    pack(&release, &by_b, &options("3.0.0", 3), &b, |_, _| {}).unwrap();
    apply(&sup, &by_b).await;
    assert_eq!(finished(&sup, "3.0.0").await.update.version, "3.0.0");

    // Back to a release below the floor: refused, naming the device; a permit for another
    // device does not help; one for this device and this bundle does.
    let old_dir = tempfile::tempdir().unwrap();
    let old = old_dir.path().join("old.bundle");
    pack(&release, &old, &options("1.9.0", 1), &b, |_, _| {}).unwrap();
    let (_, reason) = refused(&sup, &old).await;
    let device = reason
        .split("permit for device ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{reason}"))
        .to_owned();
    let digest =
        ota_bundle::read_manifest_and_digest_unverified(std::fs::File::open(&old).unwrap())
            .unwrap()
            .2;
    let permit = |device: &str| {
        let mut doc = ota_bundle::Permit::document(&ota_bundle::Permit {
            format: 1,
            product: "quote-edge".into(),
            device: device.into(),
            bundle: digest.clone(),
            version: "1.9.0".into(),
        });
        doc.sign(&b);
        doc.to_text()
    };
    std::fs::write(
        old_dir.path().join("other.permit"),
        permit("0000000000000000"),
    )
    .unwrap();
    let (_, reason) = refused(&sup, &old).await;
    assert!(reason.contains("downgrade refused"), "{reason}");
    std::fs::write(old_dir.path().join("this.permit"), permit(&device)).unwrap();
    apply(&sup, &old).await;
    let after = finished(&sup, "1.9.0").await;
    assert_eq!(
        after.update.last_result.unwrap().result,
        UpdateOutcome::Committed
    );
    assert_eq!(after.update.version, "1.9.0");
    assert_eq!(
        after.update.security_version, 3,
        "the floor stays where it was"
    );

    // The device moves forward again; the same permit beside the same old bundle is used up.
    let newer = fx.dir.path().join("newer.bundle");
    let mut newer_options = options("3.1.0", 3);
    newer_options.issued_at = 3_000;
    pack(&release, &newer, &newer_options, &b, |_, _| {}).unwrap();
    apply(&sup, &newer).await;
    assert_eq!(finished(&sup, "3.1.0").await.update.version, "3.1.0");
    let (after, reason) = refused(&sup, &old).await;
    assert!(
        reason.contains("downgrade refused") && reason.contains("a permit is used once"),
        "{reason}"
    );
    assert_eq!(after.update.version, "3.1.0");
    sup.stop().await;
}

/// A tmpfs of `size` mounted on a new temporary directory, unmounted on drop (needs root).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_larger_than_the_free_space_is_refused_before_the_slot_is_touched() {
    let Some(disk) = SmallDisk::mount("6m") else {
        tests::skip("mounting a small tmpfs needs root");
        return;
    };
    let fx = Fixture::new();
    let data = disk.0.path().join("data");
    let config = fx.config("trial = \"300ms\"\n");
    let sup = Supervisor::start_in(1, &config, &data).await;
    sup.all_ready(1).await;
    let big = fx.bundle_with_data(GOOD, "2.0.0", 2, "quote-edge", 8 << 20);
    let (after, reason) = refused(&sup, &big).await;
    assert!(
        reason.contains("free") && reason.contains("nothing was written"),
        "{reason}"
    );
    assert_eq!(after.update.version, "factory");
    assert!(
        !data.join("ota/slots/a").exists(),
        "the slot was not touched"
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_signed_by_a_stranger_neither_outranks_nor_hides_a_trusted_one() {
    let fx = Fixture::new();
    let sup = Supervisor::start(1, &fx.config("trial = \"300ms\"\n")).await;
    sup.all_ready(1).await;
    let inbox = sup.data_dir().join("ota/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    // Both bundles are made beside the inbox and renamed into it, the trusted one first: a
    // scan may run between the two renames (packing under an emulator takes seconds), and the
    // order must not depend on how fast the bundles were made.
    let staging = sup.data_dir().join("ota/staging-for-test");
    std::fs::create_dir_all(&staging).unwrap();
    // The better candidate on paper (security version 3) is signed by a key the device does
    // not trust: its claims rank nothing.
    let stranger = SecretKey::from_seed([99; 32]);
    let release = release(&fx.dir.path().join("good-3.0.0-stranger"), GOOD);
    let options = PackOptions {
        product: "quote-edge".into(),
        version: "3.0.0".into(),
        security_version: 3,
        issued_at: 3_000,
        level: 3,
    };
    pack(
        &release,
        &staging.join("a.bundle"),
        &options,
        &stranger,
        |_, _| {},
    )
    .unwrap();
    std::fs::copy(
        fx.bundle(GOOD, "2.0.0", 2, "quote-edge"),
        staging.join("b.bundle"),
    )
    .unwrap();
    std::fs::rename(staging.join("b.bundle"), inbox.join("b.bundle")).unwrap();
    std::fs::rename(staging.join("a.bundle"), inbox.join("a.bundle")).unwrap();
    // The trusted bundle goes first and is committed; the stranger's is offered after it,
    // once, and refused, saying why.
    let after = sup
        .wait_for("2.0.0 committed, then the stranger's bundle refused", |s| {
            s.update.state == UpdateState::Idle
                && s.update.version == "2.0.0"
                && s.update.last_result.as_ref().is_some_and(|r| {
                    r.result == UpdateOutcome::Refused && r.version.ends_with("a.bundle")
                })
        })
        .await;
    let reason = after.update.last_result.unwrap().reason.unwrap();
    assert!(
        reason.contains("signed by 0 of the trusted keys"),
        "{reason}"
    );
    let committed = std::fs::read_dir(sup.data_dir().join("ota/receipts"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with("-committed.receipt")
        })
        .count();
    assert_eq!(committed, 1);
    sup.stop().await;
}

/// Every file under `dir` (recursively, not following links), with its metadata, sorted.
pub(crate) fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                out.push((entry.path(), meta));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every file under `dir` with its length and modification time.
fn tree(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    walk(dir)
        .into_iter()
        .map(|(path, meta)| (path, meta.len(), meta.modified().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_older_bundle_of_the_same_security_version_is_refused() {
    let fx = Fixture::new();
    let sup = Supervisor::start(1, &fx.config("trial = \"300ms\"\n")).await;
    sup.all_ready(1).await;
    // 2.0.0 and a later build of the same security version, issued later.
    let older = fx.bundle(GOOD, "2.0.0", 2, "quote-edge");
    let newer = fx.dir.path().join("good-2.1.0.bundle");
    let options = PackOptions {
        product: "quote-edge".into(),
        version: "2.1.0".into(),
        security_version: 2,
        issued_at: 2_000,
        level: 3,
    };
    let rel = release(&fx.dir.path().join("good-2.1.0"), GOOD);
    pack(&rel, &newer, &options, &fx.key, |_, _| {}).unwrap();
    for (bundle, version) in [(&older, "2.0.0"), (&newer, "2.1.0")] {
        apply(&sup, bundle).await;
        let done = finished(&sup, version).await;
        assert_eq!(
            done.update.last_result.unwrap().result,
            UpdateOutcome::Committed
        );
    }
    let slots = sup.data_dir().join("ota/slots");
    let before = tree(&slots);

    // The older bundle is validly signed and of the current security version, but it was
    // issued before the committed release: installing it again would undo 2.1.0's fixes.
    let (after, reason) = refused(&sup, &older).await;
    assert!(
        reason.contains("replay refused") && reason.contains("1002") && reason.contains("2000"),
        "{reason}"
    );
    assert_eq!(after.update.version, "2.1.0");
    assert!(
        after
            .replicas
            .iter()
            .all(|r| r.release.as_deref() == Some("2.1.0"))
    );
    assert_eq!(tree(&slots), before, "no slot file was touched");
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_over_an_older_release_rewrites_only_the_chunks_that_changed() {
    let fx = Fixture::new();
    let sup = Supervisor::start(1, &fx.config("trial = \"300ms\"\n")).await;
    sup.all_ready(1).await;
    // 2.0.0 goes to slot a, 3.0.0 to b, then 4.0.0 to a again, over 2.0.0: the same 4 MiB of
    // data in all three.
    for (version, security_version) in [("2.0.0", 2), ("3.0.0", 3), ("4.0.0", 4)] {
        let bundle = fx.bundle_with_data(GOOD, version, security_version, "quote-edge", 4 << 20);
        apply(&sup, &bundle).await;
        let done = finished(&sup, version).await;
        assert_eq!(
            done.update.last_result.unwrap().result,
            UpdateOutcome::Committed
        );
    }
    let unchanged = |version: &str| -> u64 {
        let receipts = std::fs::read_dir(sup.data_dir().join("ota/receipts")).unwrap();
        let receipt = receipts
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            // A signed document: its second line is the receipt's JSON.
            .map(|text| {
                serde_json::from_str::<serde_json::Value>(text.lines().nth(1).unwrap()).unwrap()
            })
            .find(|r| r["to"] == version)
            .unwrap_or_else(|| panic!("no receipt for {version}"));
        receipt["unchanged_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no unchanged_bytes in {receipt}"))
    };
    assert_eq!(unchanged("2.0.0"), 0, "an empty slot holds nothing to keep");
    assert_eq!(unchanged("3.0.0"), 0);
    assert!(
        unchanged("4.0.0") >= 4 << 20,
        "the data 2.0.0 left in slot a was kept: {} bytes",
        unchanged("4.0.0")
    );
    let slot_a = sup.data_dir().join("ota/slots/a");
    let data = fx.dir.path().join("good-4.0.0-quote-edge/share/data.bin");
    assert_eq!(
        std::fs::read(slot_a.join("share/data.bin")).unwrap(),
        std::fs::read(data).unwrap()
    );
    sup.stop().await;
}
