//! The dispatcher: one task owns the model and all state, and `select!`s over a closed set of
//! events (replica exits, probe results, control requests, signals, timers). Everything else
//! (the router, the admin endpoint, the control socket, probe and wait tasks) talks to it by
//! message. It executes the model's actions, publishes the ready set to the router, and
//! feeds the watchdogs, only from this loop, so that a hung loop starves them.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_proto::{
    ErrorKind, Limits, PROTOCOL_VERSION, Reply, Request, Status, SupervisorState, UpdateState,
};
use ota_agent::source::Offer;
use ota_agent::{Agent, Layout, OtaEvent, Step};
use replica_model::{Action, Cause, Model, ProbeKind, Timing, replica_id};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, mpsc, watch};

use crate::config::Settings;
use crate::control::{self, ControlRequest};
use crate::limits::{CgroupHandle, Limiter};
use crate::metrics::{KindLabels, Metrics, RestartLabels};
use crate::process::{self, LogRing};
use crate::proxy::{self, Backend, Router};
use crate::ready::ReadySocket;
use crate::watchdog::{HardwareWatchdog, Systemd, WatchdogError};

/// The supervisor's version, as reported in `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the supervisor could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Watchdog(#[from] WatchdogError),
    #[error("the OTA agent cannot start: {0}")]
    Ota(#[from] ota_agent::UpdateError),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        use edge_proto::exit;
        match self {
            // Fixing it takes an operator: restarting cannot help.
            RunError::Ota(ota_agent::UpdateError::TestKeyTrusted { .. }) => exit::CONFIG,
            RunError::Bind { .. }
            | RunError::DataDir { .. }
            | RunError::Control(_)
            | RunError::Ota(_) => exit::IO,
            // The device is busy or absent: a configuration problem, not worth restart loops.
            RunError::Watchdog(_) => exit::CONFIG,
        }
    }
}

/// The closed set of things the dispatcher reacts to.
#[derive(Debug)]
enum Event {
    Exited {
        pid: u32,
        status: ExitStatus,
    },
    Probe {
        slot: usize,
        generation: u64,
        kind: ProbeKind,
        outcome: Result<(), String>,
        took: Duration,
    },
    Control(ControlRequest),
    /// The router has stopped accepting and its connections have drained.
    RouterDrained,
    /// The OTA agent's blocking work finished.
    Ota(OtaEvent),
    /// A replica said it is ready (`READY=1` on the readiness socket).
    Ready {
        pid: u32,
    },
    /// The router saw a replica leave a request unanswered while answering nothing else.
    Silent {
        replica: String,
        port: u16,
    },
}

struct Dispatcher {
    settings: Arc<Settings>,
    /// The public address bound (`listen` may ask for port 0).
    listen: std::net::SocketAddr,
    model: Model,
    started: Instant,
    limiter: Limiter,
    limits: Limits,
    cgroups: HashMap<u32, CgroupHandle>,
    logs: LogRing,
    metrics: Arc<Metrics>,
    routes: watch::Sender<Arc<[Backend]>>,
    events: mpsc::Sender<Event>,
    systemd: Systemd,
    hardware: Option<HardwareWatchdog>,
    restarts_seen: HashMap<String, u32>,
    stopping: bool,
    agent: Agent,
    /// The last update result counted in the metrics.
    result_seen: Option<edge_proto::UpdateResult>,
    /// The socket replicas say they are ready on (`NOTIFY_SOCKET`), if it could be bound.
    ready_socket: Option<PathBuf>,
}

/// Runs the supervisor until SIGTERM or SIGINT, then stops in order: the public address stops
/// accepting, in-flight requests drain, replicas leave the rotation and are stopped with their
/// grace, and nothing is left running.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    Bound::bind(settings).await?.run(stop_signal()).await
}

/// A supervisor whose addresses, control socket and devices are open, not yet running.
#[derive(Debug)]
pub struct Bound {
    settings: Arc<Settings>,
    public: TcpListener,
    admin: Option<TcpListener>,
    control: UnixListener,
    hardware: Option<HardwareWatchdog>,
    ready: Option<ReadySocket>,
}

impl Bound {
    /// Claims everything the supervisor needs, so that a configuration that cannot work fails
    /// here, before any replica starts.
    pub async fn bind(settings: Settings) -> Result<Bound, RunError> {
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| RunError::DataDir {
            path: settings.data_dir.clone(),
            source,
        })?;
        let public = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| RunError::Bind {
                what: "public address",
                addr: settings.listen,
                source,
            })?;
        let admin = match settings.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::Bind {
                        what: "admin address",
                        addr,
                        source,
                    })?,
            ),
            None => None,
        };
        let control = control::bind(&settings.control_socket, settings.control_gid)?;
        let hardware = match &settings.watchdog {
            Some(w) => Some(HardwareWatchdog::open(&w.device, w.timeout)?),
            None => None,
        };
        // Beside the control socket: the sockets stay together, wherever the configuration
        // puts them (the data directory by default).
        let ready = ReadySocket::bind(
            settings
                .control_socket
                .parent()
                .unwrap_or(&settings.data_dir),
        );
        Ok(Bound {
            settings: Arc::new(settings),
            public,
            admin,
            control,
            hardware,
            ready,
        })
    }

    /// The public address actually bound (useful with port 0).
    pub fn public_addr(&self) -> std::net::SocketAddr {
        self.public.local_addr().unwrap_or(self.settings.listen)
    }

    /// The admin address actually bound, if any.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// Runs until `stop` completes, then stops in order (see [`run`]).
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<(), RunError> {
        let Bound {
            settings,
            public,
            admin,
            control: control_socket,
            hardware,
            ready,
        } = self;
        let (limiter, limits) = Limiter::detect(&settings.resources);
        tracing::info!(
            listen = %settings.listen,
            replicas = settings.replicas,
            limits = %limits.mode,
            note = limits.note.as_deref().unwrap_or(""),
            control = %settings.control_socket.display(),
            "edge-supervisor starting"
        );

        let metrics = Arc::new(Metrics::default());
        let (routes, backends) = watch::channel::<Arc<[Backend]>>(Arc::from(Vec::new()));
        let (events, inbox) = mpsc::channel::<Event>(1024);
        let listen = public.local_addr().unwrap_or(settings.listen);
        let servers = Servers {
            public,
            admin,
            control: control_socket,
        };
        let stop_router = servers.spawn(&settings, backends, &metrics, &events);
        let ready_socket = ready.map(|socket| {
            let path = socket.path().to_owned();
            let events = events.clone();
            tokio::spawn(socket.serve(move |pid| {
                // A full inbox drops the word: the replica is polled as if it had not spoken.
                let _ = events.try_send(Event::Ready { pid });
            }));
            path
        });

        let notify = {
            let events = events.clone();
            Arc::new(move |event| {
                let _ = events.blocking_send(Event::Ota(event));
            })
        };
        let agent = Agent::open(
            Layout::new(&settings.data_dir),
            settings.ota.clone(),
            settings.trusted_keys.clone(),
            process::release_command(&settings.service, &settings.data_dir),
            notify,
        )?;
        tracing::info!(release = %agent.running_version(), "release");
        let now = Instant::now();
        let timing = Timing {
            probes: settings.probes.clone(),
            restart: settings.restart.clone(),
            stop_grace: settings.service.stop_grace,
            hung_grace: settings.service.hung_grace,
        };
        let dispatcher = Dispatcher {
            model: Model::new(settings.replicas, timing, now, fastrand::u64(..)),
            logs: LogRing::new(settings.service.log_lines),
            settings: Arc::clone(&settings),
            listen,
            started: now,
            limiter,
            limits,
            cgroups: HashMap::new(),
            metrics,
            routes,
            events,
            systemd: Systemd::default(),
            hardware,
            restarts_seen: HashMap::new(),
            stopping: false,
            result_seen: agent.status().last_result,
            agent,
            ready_socket,
        };

        dispatcher.run(inbox, stop, &stop_router).await;
        let _ = std::fs::remove_file(&settings.control_socket);
        tracing::info!("stopped");
        Ok(())
    }
}

/// The listeners bound before the supervisor runs.
struct Servers {
    public: TcpListener,
    admin: Option<TcpListener>,
    control: UnixListener,
}

impl Servers {
    /// Starts the router (its drain reported as `Event::RouterDrained`), the control socket
    /// and the admin endpoint, all talking to the dispatcher by message. Returns what stops
    /// the router.
    fn spawn(
        self,
        settings: &Settings,
        backends: watch::Receiver<Arc<[Backend]>>,
        metrics: &Arc<Metrics>,
        events: &mpsc::Sender<Event>,
    ) -> Arc<Notify> {
        let (control_tx, mut control_rx) = mpsc::channel::<ControlRequest>(64);
        let stop_router = Arc::new(Notify::new());
        // In-band detection uses the readiness probe's timeout, and needs the probe to confirm.
        let silence = settings.probes.readiness.as_ref().map(|probe| {
            let events = events.clone();
            proxy::Silence {
                after: probe.timeout,
                report: Arc::new(move |backend: &Backend| {
                    // A full inbox drops the report: the probes still find the replica.
                    let _ = events.try_send(Event::Silent {
                        replica: backend.id.clone(),
                        port: backend.port,
                    });
                }),
            }
        });
        {
            let cap = proxy::connection_cap();
            let per_peer = settings.max_connections_per_peer;
            let limits = proxy::Limits::new(cap, per_peer);
            let grace = settings.service.stop_grace;
            // One accept loop per core, each on its own thread with a current-thread runtime,
            // its own router and its own pool of connections to the replicas: a request is
            // read, forwarded and answered on one thread, with none of the cross-thread
            // wake-ups of a shared scheduler (HAProxy's requests per second: 0.84x -> 0.89x at
            // 32 connections, 0.78x -> 0.94x at 256; image/MEASUREMENTS.md). The loops share
            // the listening socket, the limits, the metrics, the in-band silence report and the
            // round-robin position; the stop reaches every loop, and the drain is reported once
            // all are done.
            let (loops, own_runtime) = router_loops(self.public);
            let (stop_tx, stop_rx) = watch::channel(false);
            let (drained_tx, mut drained_rx) = mpsc::channel::<()>(loops.len().max(1));
            tracing::info!(connections = cap, per_peer, loops = loops.len(), header_timeout = ?proxy::HEADER_TIMEOUT, "router limits");
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for listener in loops {
                let router = Arc::new(Router::new(
                    backends.clone(),
                    Arc::clone(metrics),
                    silence.clone(),
                    Arc::clone(&next),
                ));
                let mut stop_rx = stop_rx.clone();
                let limits = limits.clone();
                let drained_tx = drained_tx.clone();
                let serve = async move {
                    let stop = async move {
                        let _ = stop_rx.wait_for(|stop| *stop).await;
                    };
                    match listener.into_tokio() {
                        Ok(listener) => proxy::serve(listener, router, stop, grace, limits).await,
                        Err(error) => {
                            tracing::error!(%error, "a router loop cannot use the listening socket");
                        }
                    }
                    let _ = drained_tx.send(()).await;
                };
                if own_runtime {
                    // The runtime is built on the thread, so that a thread that cannot start
                    // drops no runtime here (a runtime may not be dropped in async code).
                    let spawned = std::thread::Builder::new()
                        .name("edge-router".into())
                        .spawn(move || {
                            match tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                            {
                                Ok(runtime) => runtime.block_on(serve),
                                Err(error) => {
                                    tracing::error!(%error, "cannot build a router loop's runtime");
                                }
                            }
                        });
                    if let Err(error) = spawned {
                        tracing::error!(%error, "cannot start a router thread");
                    }
                } else {
                    tokio::spawn(serve);
                }
            }
            drop(drained_tx);
            let stop = Arc::clone(&stop_router);
            let events = events.clone();
            tokio::spawn(async move {
                stop.notified().await;
                let _ = stop_tx.send(true);
                // Each loop's sender is dropped once it has drained (or never started).
                while drained_rx.recv().await.is_some() {}
                let _ = events.send(Event::RouterDrained).await;
            });
        }
        tokio::spawn(control::serve(
            self.control,
            settings.control_gid,
            control_tx.clone(),
        ));
        {
            let events = events.clone();
            tokio::spawn(async move {
                while let Some(request) = control_rx.recv().await {
                    if events.send(Event::Control(request)).await.is_err() {
                        break;
                    }
                }
            });
        }
        if let Some(admin) = self.admin {
            tokio::spawn(crate::metrics::serve_admin(
                admin,
                Arc::clone(metrics),
                control_tx,
            ));
        }
        stop_router
    }
}

/// The listening socket of one router loop: the tokio listener itself, for a loop on the
/// supervisor's runtime, or a duplicate of it, registered by the loop's own runtime.
enum LoopListener {
    Tokio(TcpListener),
    Std(std::net::TcpListener),
}

impl LoopListener {
    /// Called inside the runtime that will poll it.
    fn into_tokio(self) -> std::io::Result<TcpListener> {
        match self {
            LoopListener::Tokio(listener) => Ok(listener),
            LoopListener::Std(listener) => TcpListener::from_std(listener),
        }
    }
}

/// Most router loops: one per core, up to this.
const MAX_ROUTER_LOOPS: usize = 4;

/// The router's accept loops: one per core (at most `MAX_ROUTER_LOOPS`), each on a thread
/// with a current-thread runtime of its own (`true`), sharing the socket through duplicates.
/// On one core, or should the socket not leave the supervisor's runtime, one loop on that
/// runtime (`false`), as before.
fn router_loops(public: TcpListener) -> (Vec<LoopListener>, bool) {
    let wanted = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(MAX_ROUTER_LOOPS);
    if wanted < 2 {
        return (vec![LoopListener::Tokio(public)], false);
    }
    let public = match public.into_std() {
        Ok(listener) => listener,
        Err(error) => {
            // The socket left the reactor half-way: nothing can serve on it.
            tracing::error!(%error, "cannot hand the public socket to the router threads");
            return (Vec::new(), false);
        }
    };
    let mut loops = Vec::with_capacity(wanted);
    for _ in 1..wanted {
        match public.try_clone() {
            Ok(listener) => loops.push(LoopListener::Std(listener)),
            Err(error) => {
                tracing::warn!(%error, "cannot duplicate the public socket: fewer router loops");
                break;
            }
        }
    }
    loops.push(LoopListener::Std(public));
    (loops, true)
}

impl Dispatcher {
    /// The loop: one event, timer or tick at a time, until the model has stopped everything
    /// after `stop` (or a fatal error). Watchdogs are fed only from here.
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Event>,
        stop: impl Future<Output = ()>,
        stop_router: &Notify,
    ) {
        let settings = Arc::clone(&self.settings);
        let watchdog_every = [
            Systemd::watchdog_interval(),
            settings.watchdog.as_ref().map(|w| w.timeout / 3),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(3600));
        let mut feed = tokio::time::interval(watchdog_every);
        feed.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scan = tokio::time::interval(settings.ota.scan_interval);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);

        loop {
            self.ota_step(Instant::now());
            self.execute();
            self.publish();
            if self.model.is_finished() {
                break;
            }
            let deadline = [self.model.next_deadline(), self.agent.next_deadline()]
                .into_iter()
                .flatten()
                .min()
                .map_or_else(
                    || tokio::time::Instant::now() + Duration::from_secs(3600),
                    tokio::time::Instant::from_std,
                );
            tokio::select! {
                Some(event) = inbox.recv() => self.handle(event),
                () = tokio::time::sleep_until(deadline) => self.model.tick(Instant::now()),
                _ = feed.tick() => self.feed_watchdogs(),
                _ = scan.tick(), if !self.stopping => self.scan(),
                () = &mut stop, if !self.stopping => {
                    tracing::info!("stopping: draining the router, then the replicas");
                    self.stopping = true;
                    Systemd::stopping();
                    stop_router.notify_one();
                }
            }
        }
        if let Some(hardware) = self.hardware.take() {
            hardware.close();
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let recv = |s: &mut Option<tokio::signal::unix::Signal>| {
        let s = s.take();
        async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
    };
    tokio::select! {
        () = recv(&mut term) => {}
        () = recv(&mut int) => {}
    }
}

impl Dispatcher {
    fn handle(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Exited { pid, status } => {
                let cause = self.exit_cause(pid, status);
                if let Some(slot) = self.model.slot_of(pid) {
                    if self.model.is_shutting_down() {
                        tracing::info!(replica = %replica_id(slot), pid, ?status, "replica stopped");
                    } else {
                        tracing::warn!(replica = %replica_id(slot), pid, reason = %cause.reason(), ?status, "replica exited");
                    }
                }
                self.model.exited(pid, cause, now);
            }
            Event::Probe {
                slot,
                generation,
                kind,
                outcome,
                took,
            } => {
                let labels = KindLabels {
                    kind: kind.as_str().to_owned(),
                };
                self.metrics
                    .probe_seconds
                    .get_or_create(&labels)
                    .observe(took.as_secs_f64());
                if let Err(error) = &outcome {
                    self.metrics.probe_failures.get_or_create(&labels).inc();
                    tracing::debug!(replica = %replica_id(slot), kind = kind.as_str(), %error, "probe failed");
                }
                self.model
                    .probe_result(slot, generation, kind, outcome, now);
            }
            Event::Control(ControlRequest { request, reply }) => {
                let answer = self.control(request, now);
                let _ = reply.send(answer);
            }
            Event::RouterDrained => self.model.shutdown(now),
            Event::Ready { pid } => {
                if self.model.notified(pid, now) {
                    tracing::debug!(pid, "replica says it is ready; probing now");
                }
            }
            Event::Ota(event) => self.ota_event(event, now),
            Event::Silent { replica, port } => {
                if self.model.silent(&replica, port, now) {
                    self.metrics.silent_ejections.inc();
                    tracing::warn!(%replica, "out of rotation: a request went unanswered; a readiness probe decides when it comes back");
                }
            }
        }
    }

    fn scan(&mut self) {
        self.agent.scan();
    }

    fn ota_event(&mut self, event: OtaEvent, now: Instant) {
        let step = match event {
            OtaEvent::Found(found) => {
                self.agent.scanned();
                if let Some(bundle) = found.into_iter().next()
                    && !self.stopping
                {
                    match &bundle {
                        Offer::File(_) => tracing::info!(%bundle, "inbox: installing"),
                        Offer::Depot(_) => tracing::info!(%bundle, "depot: installing"),
                    }
                    if let Err(error) = self.agent.start_install(bundle) {
                        tracing::debug!(%error, "not now");
                    }
                }
                Step::None
            }
            other => self.agent.on_event(other, now),
        };
        self.ota_apply(step, now);
    }

    /// Lets the agent judge the trial and carries out what it decides.
    fn ota_step(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        if self.agent.draining() && self.model.is_empty() {
            let step = self.agent.drained(now);
            self.ota_apply(step, now);
        }
        let model = &self.model;
        let step = self.agent.watch(
            |revision| model.settled_on(revision),
            |revision| model.failures(revision).map(|(_, last)| last.clone()),
            now,
        );
        self.ota_apply(step, now);
    }

    fn ota_apply(&mut self, step: Step, now: Instant) {
        match step {
            Step::None => {}
            Step::RollOut(revision) => self.model.roll_out(revision, now),
            Step::Recreate(revision) => self.model.recreate(revision, now),
            Step::Resume => self.model.resume(now),
        }
    }

    fn control(&mut self, request: Request, now: Instant) -> Reply {
        match request {
            Request::Status => Reply::Status(Box::new(self.status(now))),
            Request::Scale { replicas } if replicas > self.settings.max_replicas => control::error(
                ErrorKind::OutOfRange,
                &format!(
                    "{replicas} is above max_replicas ({})",
                    self.settings.max_replicas
                ),
            ),
            Request::Scale { replicas } => match self.model.scale(replicas, now) {
                Ok(()) => Reply::Accepted {
                    message: format!("scaling to {replicas} replicas"),
                },
                Err(e) => control::error(ErrorKind::NotAllowedNow, &e.to_string()),
            },
            Request::Restart { replica } => match self.model.restart(&replica, now) {
                Ok(()) => Reply::Accepted {
                    message: format!("{replica} is being replaced"),
                },
                Err(replica_model::Refused::UnknownReplica(_)) => control::error(
                    ErrorKind::UnknownReplica,
                    &format!("there is no replica {replica}"),
                ),
                Err(e) => control::error(ErrorKind::NotAllowedNow, &e.to_string()),
            },
            Request::Logs { replica, lines } => {
                if !self.model.has_replica(&replica) && self.logs.tail(&replica, 1).is_empty() {
                    return control::error(
                        ErrorKind::UnknownReplica,
                        &format!("there is no replica {replica}"),
                    );
                }
                let n = lines.unwrap_or(100) as usize;
                Reply::Logs {
                    lines: self.logs.tail(&replica, n),
                    replica,
                }
            }
            Request::Apply { bundle } => {
                let path = std::path::PathBuf::from(&bundle);
                if !path.is_absolute() {
                    return control::error(
                        ErrorKind::BadRequest,
                        &format!("the bundle path {bundle:?} must be absolute"),
                    );
                }
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => {
                        return control::error(
                            ErrorKind::BadRequest,
                            &format!("the bundle {bundle} is not a regular file"),
                        );
                    }
                    Err(error) => {
                        return control::error(
                            ErrorKind::BadRequest,
                            &format!("cannot read the bundle {bundle}: {error}"),
                        );
                    }
                }
                match self.agent.start_install(path.into()) {
                    Ok(()) => Reply::Accepted {
                        message: format!(
                            "installing {bundle}; `status` shows the progress and the result"
                        ),
                    },
                    Err(busy) => control::error(ErrorKind::NotAllowedNow, &busy.to_string()),
                }
            }
        }
    }

    fn status(&self, now: Instant) -> Status {
        let mut replicas = self.model.status(now);
        for (replica, (_, revision)) in replicas.iter_mut().zip(self.model.revisions()) {
            replica.release = self.agent.version_of_revision(revision);
        }
        Status {
            version: VERSION.to_owned(),
            protocol: PROTOCOL_VERSION,
            state: if self.stopping {
                SupervisorState::Stopping
            } else if replicas.iter().any(|r| r.ready) {
                SupervisorState::Running
            } else {
                SupervisorState::Starting
            },
            listen: self.listen.to_string(),
            desired: self.model.desired(),
            ready: replicas.iter().filter(|r| r.ready).count() as u32,
            limits: self.limits.clone(),
            replicas,
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            update: self.agent.status(),
        }
    }

    /// How a process ended; an OOM kill is read from its cgroup's `memory.events`.
    fn exit_cause(&mut self, pid: u32, status: ExitStatus) -> Cause {
        let oom = self.cgroups.remove(&pid).is_some_and(|cgroup| {
            let killed = cgroup.oom_kills() > 0;
            cgroup.remove();
            killed
        });
        if oom {
            self.metrics.oom_kills.inc();
            Cause::OomKill
        } else if let Some(code) = status.code() {
            Cause::Exit(code)
        } else {
            Cause::Signal(status.signal().unwrap_or(0))
        }
    }

    /// Carries out what the model asked for, until it asks for nothing more.
    fn execute(&mut self) {
        loop {
            let actions = self.model.take_actions();
            if actions.is_empty() {
                return;
            }
            // Routing first: a replica leaves the rotation before any signal reaches it.
            self.publish_routes();
            for action in actions {
                match action {
                    Action::Spawn {
                        slot,
                        generation,
                        revision,
                    } => self.spawn(slot, generation, revision),
                    Action::Probe {
                        slot,
                        generation,
                        kind,
                        port,
                    } => self.probe(slot, generation, kind, port),
                    Action::Signal { pid, signal } => {
                        if let Err(error) = process::signal_group(pid, signal) {
                            tracing::warn!(pid, ?signal, %error, "cannot signal a replica");
                        }
                    }
                }
            }
        }
    }

    fn spawn(&mut self, slot: usize, generation: u64, revision: u64) {
        let now = Instant::now();
        let replica = replica_id(slot);
        // A slot's files are checked against their signed manifest before they run.
        if let Err(error) = self.agent.check_release(revision) {
            tracing::error!(%replica, %error, "not started");
            self.model
                .spawned(slot, generation, Err(error.to_string()), now);
            return;
        }
        let port = match process::free_port() {
            Ok(port) => port,
            Err(error) => {
                self.model
                    .spawned(slot, generation, Err(format!("no free port: {error}")), now);
                return;
            }
        };
        let values = self.placeholders(slot, port, revision);
        let launch = process::launch(&self.settings.service, &values);
        match process::spawn(
            &launch,
            &replica,
            &self.logs,
            true,
            self.ready_socket.as_deref(),
        ) {
            Ok((pid, exited)) => {
                let events = self.events.clone();
                tokio::spawn(async move {
                    // A wait error leaves no status to report; count it as a kill.
                    let status = exited.await.unwrap_or_else(|_| ExitStatus::from_raw(9));
                    let _ = events.send(Event::Exited { pid, status }).await;
                });
                match self
                    .limiter
                    .apply(&self.settings.resources, &replica, generation, pid)
                {
                    Ok(Some(cgroup)) => {
                        self.cgroups.insert(pid, cgroup);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        // Never run a replica without the limits it was promised.
                        tracing::error!(%error, "killing a replica that could not be limited");
                        let _ = process::signal_group(pid, replica_model::Signal::Kill);
                    }
                }
                tracing::info!(%replica, pid, port, "replica started");
                self.model.spawned(slot, generation, Ok((pid, port)), now);
            }
            Err(error) => {
                let message = format!("cannot start {}: {error}", launch.program.display());
                tracing::error!(%replica, "{message}");
                self.model.spawned(slot, generation, Err(message), now);
            }
        }
    }

    /// A replica's placeholders, `{release}` being the directory of its release's programs.
    fn placeholders(&self, slot: usize, port: u16, revision: u64) -> process::Placeholders {
        let dir = self.agent.release_dir_of(revision);
        process::Placeholders::new(&self.settings.data_dir, slot, port, &dir)
    }

    fn probe(&self, slot: usize, generation: u64, kind: ProbeKind, port: u16) {
        let probe = match kind {
            ProbeKind::Startup => self.settings.probes.startup.clone(),
            ProbeKind::Liveness => self.settings.probes.liveness.clone(),
            ProbeKind::Readiness => self.settings.probes.readiness.clone(),
        };
        let Some(probe) = probe else { return };
        let events = self.events.clone();
        let revision = self
            .model
            .revisions()
            .into_iter()
            .find(|(id, _)| *id == replica_id(slot))
            .map_or(0, |(_, r)| r);
        let values = self.placeholders(slot, port, revision);
        let user = self.settings.service.user.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = crate::probe::run(&probe, port, user.as_ref(), |w| values.fill(w)).await;
            let took = started.elapsed();
            let _ = events
                .send(Event::Probe {
                    slot,
                    generation,
                    kind,
                    outcome,
                    took,
                })
                .await;
        });
    }

    fn publish_routes(&self) {
        // A replica that stays in rotation keeps what the router has seen of it.
        let current = self.routes.borrow().clone();
        let ready: Vec<Backend> = self
            .model
            .ready_backends()
            .into_iter()
            .map(|(id, port)| {
                let new = Backend::new(id, port);
                current.iter().find(|b| **b == new).cloned().unwrap_or(new)
            })
            .collect();
        self.routes.send_if_modified(|current| {
            if current[..] == ready[..] {
                false
            } else {
                tracing::info!(ready = ?ready.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), "rotation changed");
                *current = Arc::from(ready);
                true
            }
        });
    }

    /// Routing, gauges, restart counters and systemd's status line, after every step.
    fn publish(&mut self) {
        self.publish_routes();
        let now = Instant::now();
        let replicas = self.model.status(now);
        let ready = replicas.iter().filter(|r| r.ready).count() as u32;
        let desired = self.model.desired();
        self.metrics.ready.set(i64::from(ready));
        self.metrics.desired.set(i64::from(desired));
        self.metrics
            .crash_looping
            .set(replicas.iter().filter(|r| r.crash_looping).count() as i64);
        for r in &replicas {
            let seen = self.restarts_seen.entry(r.id.clone()).or_default();
            if r.restarts > *seen {
                let reason = r
                    .last_exit
                    .as_ref()
                    .map_or("unknown", |e| e.reason.as_str())
                    .to_owned();
                if r.crash_looping {
                    tracing::warn!(replica = %r.id, restarts = r.restarts, "crash looping: restarting at the slowest pace");
                }
                self.metrics
                    .restarts
                    .get_or_create(&RestartLabels {
                        replica: r.id.clone(),
                        reason,
                    })
                    .inc_by(u64::from(r.restarts - *seen));
                *seen = r.restarts;
            }
        }
        let update = self.agent.status();
        self.metrics
            .update_in_progress
            .set(i64::from(update.state != UpdateState::Idle));
        self.metrics
            .security_version
            .set(i64::try_from(update.security_version).unwrap_or(i64::MAX));
        if update.last_result.is_some() && update.last_result != self.result_seen {
            if let Some(result) = &update.last_result {
                self.metrics
                    .update_results
                    .get_or_create(&crate::metrics::ResultLabels {
                        result: result.result.as_str().to_owned(),
                    })
                    .inc();
            }
            self.result_seen = update.last_result;
        }
        if !self.stopping {
            self.systemd.update(ready, desired);
        }
    }

    fn feed_watchdogs(&mut self) {
        Systemd::ping();
        if let Some(hardware) = &mut self.hardware {
            hardware.feed();
        }
    }
}
