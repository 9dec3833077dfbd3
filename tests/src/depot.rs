//! `ota-depot serve` as a test starts it: on a loopback port the kernel picks, its log kept
//! and shown when the test fails.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use depot_proto::client::Client;
use depot_proto::wire::Status;

/// A running depot.
pub struct Depot {
    child: Child,
    pub url: String,
    /// Its data directory (database, bundles, `admin.token`).
    pub data: PathBuf,
    /// Its log, shown when a test fails.
    log: Arc<Mutex<Vec<String>>>,
}

impl Depot {
    /// Starts the workspace's `ota-depot` with `data` and the release keys in `keys`, plus
    /// `extra` arguments, and waits for the line that says where it listens.
    pub fn start(data: &Path, keys: &Path, extra: &[&str]) -> Depot {
        let mut child = crate::command(&crate::workspace_binary("ota-depot"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .arg("--trusted-keys")
            .arg(keys)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ota-depot");
        // The address is in the "listening" line; the rest of the log is drained (and shown
        // if the test fails) so the depot never blocks on a full pipe.
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("log").push(line.clone());
                if line.contains("listening")
                    && let Some(address) = line.split("address=").nth(1)
                {
                    let _ = tx.send(address.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let Ok(address) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.wait();
            panic!("the depot did not start: {:#?}", log.lock().expect("log"));
        };
        Depot {
            child,
            url: format!("http://{address}"),
            data: data.to_owned(),
            log,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, Duration::from_secs(30))
    }

    /// A client with the operator's token.
    pub fn admin(&self) -> Client {
        let token = std::fs::read_to_string(self.data.join("admin.token")).expect("admin token");
        self.client().with_token(token.trim().to_owned())
    }

    pub fn status(&self) -> Status {
        self.client().status().expect("depot status")
    }

    /// Its log so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// SIGKILL, and waits for it.
    pub fn kill(mut self) {
        self.child.kill().expect("kill the depot");
        self.child.wait().expect("reap the depot");
    }
}

impl Drop for Depot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let mut stderr = std::io::stderr().lock();
            for line in self.log.lock().expect("log").iter() {
                let _ = writeln!(stderr, "depot: {line}");
            }
        }
    }
}
