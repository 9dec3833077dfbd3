//! The OTA agent against a fleet depot: the workspace's `ota-depot` on loopback, the supervisor
//! polling it (`[ota] depot`), bundles streamed into the slot as they download, outcomes
//! reported with the device's signed receipt.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use depot_proto::wire::{MemberState, RolloutState, Status};
use edge_proto::UpdateOutcome;
use ota_bundle::{Plan, Wave};
use tests::depot::Depot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::supervisor::{Supervisor, get};
use crate::update::{CRASHES, Fixture, GOOD, finished, post};

const DEADLINE: Duration = Duration::from_secs(90);

/// The rollout plan of `bundle` in `waves`, signed with the fixture's release key.
pub(crate) fn plan(fx: &Fixture, bundle: &Path, waves: &str) -> String {
    let file = std::fs::File::open(bundle).unwrap();
    let (manifest, _, digest) = ota_bundle::read_manifest_and_digest_unverified(file).unwrap();
    let waves = waves.split(',').map(|w| Wave::parse(w).unwrap()).collect();
    let plan = Plan::new(
        &manifest.product,
        &digest,
        &manifest.version,
        waves,
        90,
        10,
        1,
    )
    .unwrap();
    let mut doc = plan.document();
    doc.sign(&fx.key);
    doc.to_text()
}

/// Uploads `bundle` and publishes its plan.
async fn publish(depot: &Depot, fx: &Fixture, bundle: &Path, waves: &str) {
    let (admin, bundle, plan) = (depot.admin(), bundle.to_owned(), plan(fx, bundle, waves));
    tokio::task::spawn_blocking(move || {
        admin.upload_bundle(&bundle).unwrap();
        admin.publish_plan(plan.as_bytes()).unwrap();
    })
    .await
    .unwrap();
}

/// Waits until the depot's status meets `condition`.
async fn depot_until(depot: &Depot, what: &str, condition: impl Fn(&Status) -> bool) -> Status {
    let until = Instant::now() + DEADLINE;
    loop {
        let client = depot.client();
        let status = tokio::task::spawn_blocking(move || client.status().unwrap())
            .await
            .unwrap();
        if condition(&status) {
            return status;
        }
        assert!(
            Instant::now() < until,
            "never saw {what}; depot: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fixture's depot: its release key trusted.
pub(crate) fn start_depot(fx: &Fixture) -> Depot {
    Depot::start(
        &fx.dir.path().join("depot"),
        &fx.dir.path().join("keys"),
        &[],
    )
}

/// A supervisor of 3 ready replicas polling `url` (the depot, or a proxy in front of it) every
/// second, once the depot has seen it.
async fn enrolled(fx: &Fixture, depot: &Depot, url: &str) -> Supervisor {
    let config = fx.config(&format!(
        "trial = \"1s\"\ndepot = \"{url}\"\npoll_interval = \"1s\"\n"
    ));
    let sup = Supervisor::start(3, &config).await;
    sup.all_ready(3).await;
    depot_until(depot, "the device enrolled", |s| s.devices == 1).await;
    sup
}

/// Every regular file under `dir` that starts like a bundle.
fn bundle_copies(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let (path, kind) = (entry.path(), entry.file_type().unwrap());
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let mut magic = [0u8; 8];
                let head = std::fs::File::open(&path).and_then(|mut f| {
                    use std::io::Read;
                    f.read_exact(&mut magic)
                });
                // A slot's kept head (`<slot>.head`) is the bundle's first bytes by design.
                if head.is_ok()
                    && &magic == ota_bundle::MAGIC
                    && path.extension().is_none_or(|e| e != "head")
                {
                    found.push(path);
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_depot_rollout_streams_into_the_slot_commits_and_reports_the_signed_receipt() {
    let fx = Fixture::new();
    let depot = start_depot(&fx);
    let sup = enrolled(&fx, &depot, &depot.url).await;
    let kept = post(&sup, "Written before the depot's update").await;
    let bundle = fx.bundle_with_data(GOOD, "2.0.0", 2, "quote-edge", 3 << 20);
    let size = std::fs::metadata(&bundle).unwrap().len();
    publish(&depot, &fx, &bundle, "100%").await;

    let after = finished(&sup, "2.0.0").await;
    let result = after.update.last_result.clone().unwrap();
    assert_eq!(result.result, UpdateOutcome::Committed, "{after:#?}");
    // Completed by the receipt; the next poll says what runs.
    let status = depot_until(&depot, "the rollout completed and 2.0.0 running", |s| {
        s.rollouts[0].state == RolloutState::Completed
            && s.fleet[0].version.as_deref() == Some("2.0.0")
    })
    .await;
    assert_eq!(status.rollouts[0].members[0].state, MemberState::Committed);
    // The outcome came with the device's receipt (not only from the version a poll carries).
    let db = rusqlite::Connection::open(depot.data.join("depot.db")).unwrap();
    let receipt: Option<String> = db
        .query_row(
            "SELECT receipt FROM reports WHERE state = 'committed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let receipt = receipt.expect("the committed report carries the receipt");
    assert!(receipt.contains("\"result\":\"committed\""), "{receipt}");
    // Installed while downloading: no copy of the bundle anywhere in the data directory, and
    // the depot sent the bundle once (plus its few KiB of head, read again to keep it).
    assert_eq!(
        bundle_copies(sup.data_dir()),
        Vec::<std::path::PathBuf>::new()
    );
    let served = status.rollouts[0].bytes_served;
    assert!(
        served >= size && served < size + 64 * 1024,
        "{served} bytes served for a bundle of {size}"
    );
    let (code, _, _) = get(sup.addr, &format!("/quotes/{kept}")).await.unwrap();
    assert_eq!(code, 200);
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_crashes_is_rolled_back_and_halts_the_depots_rollout() {
    let fx = Fixture::new();
    let depot = start_depot(&fx);
    let sup = enrolled(&fx, &depot, &depot.url).await;
    let bundle = fx.bundle(CRASHES, "2.0.0", 2, "quote-edge");
    publish(&depot, &fx, &bundle, "1,100%").await;
    let after = finished(&sup, "2.0.0").await;
    assert_eq!(
        after.update.last_result.unwrap().result,
        UpdateOutcome::RolledBack
    );
    let status = depot_until(&depot, "the rollout halted", |s| {
        s.rollouts[0].state == RolloutState::Halted
    })
    .await;
    let rollout = &status.rollouts[0];
    assert_eq!(rollout.members[0].state, MemberState::RolledBack);
    assert_eq!(
        rollout.reason.as_deref(),
        Some("1 of 1 reports failed, over the error threshold of 10%")
    );
    sup.all_ready(3).await;
    sup.stop().await;
}

/// A TCP proxy in front of the depot that cuts the first bundle download after `cut_after`
/// bytes of its answer; counts every byte of bundle answers it passes on.
struct CuttingProxy {
    url: String,
    cut: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
}

impl CuttingProxy {
    async fn start(depot: &str, cut_after: u64) -> CuttingProxy {
        let upstream: std::net::SocketAddr = depot.trim_start_matches("http://").parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (cut, delivered) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (cut2, delivered2) = (cut.clone(), delivered.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (cut, delivered) = (cut2.clone(), delivered2.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    // The request's head: small, read whole before deciding.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                        if client.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let bundle = head.starts_with(b"GET /bundles/");
                    let cut_this = bundle && !cut.swap(true, Ordering::SeqCst);
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let mut passed = 0u64;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = if cut_this {
                            n.min((cut_after - passed) as usize)
                        } else {
                            n
                        };
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        passed += n as u64;
                        if bundle {
                            delivered.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        if cut_this && passed >= cut_after {
                            // The link goes down mid-answer.
                            break;
                        }
                    }
                });
            }
        });
        CuttingProxy {
            url,
            cut,
            delivered,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_midway_resumes_from_the_byte_where_it_stopped() {
    let fx = Fixture::new();
    let depot = start_depot(&fx);
    let proxy = CuttingProxy::start(&depot.url, 1 << 20).await;
    let sup = enrolled(&fx, &depot, &proxy.url).await;
    let bundle = fx.bundle_with_data(GOOD, "2.0.0", 2, "quote-edge", 3 << 20);
    let size = std::fs::metadata(&bundle).unwrap().len();
    publish(&depot, &fx, &bundle, "100%").await;
    let after = finished(&sup, "2.0.0").await;
    // The install finished: every chunk verified after the cut, the slot switched to. What the
    // trial then decides is not this test's business: under qemu-user beside the other tests,
    // a replica of the new release once failed its liveness and the trial rolled it back.
    let result = after.update.last_result.unwrap();
    assert!(
        matches!(
            result.result,
            UpdateOutcome::Committed | UpdateOutcome::RolledBack
        ),
        "{result:?}"
    );
    assert!(proxy.cut.load(Ordering::SeqCst), "the download was cut");
    // Everything the proxy passed on for the bundle, response headers included, against the
    // bundle: what was asked for again after the cut is what was lost in flight (the HTTP
    // client's buffer), far less than one 1 MiB chunk.
    let delivered = proxy.delivered.load(Ordering::SeqCst);
    let again = delivered.saturating_sub(size);
    assert!(
        delivered >= size,
        "{delivered} bytes delivered for a bundle of {size}"
    );
    assert!(
        again < 512 * 1024,
        "{again} bytes downloaded again after the cut"
    );
    sup.stop().await;
}
