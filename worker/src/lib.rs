//! The pool worker daemon (`rlhf worker --role R --coordinator URL`): register with a
//! coordinator, heartbeat, and keep the assigned service processes running. It speaks to the
//! coordinator only through the `WorkerService` protocol and starts services the same way the
//! local launcher does ([`rlhf_proto::process::worker_process`]), so it depends on no part of
//! the control plane.
//!
//! Failure model: while the coordinator is unreachable (a failover, a restart) the processes
//! run on and heartbeats are retried. Once the worker has not been heard for longer than its
//! lease, the coordinator has given its work away: it stops its processes (so no job ever runs
//! twice) and registers again as soon as a coordinator answers.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rlhf_proto::client::{Timeouts, WorkersClient};
use rlhf_proto::process::assignment_state as state;
use rlhf_proto::process::{READY_TIMEOUT, ServiceProcess, free_ports, worker_process};
use rlhf_proto::v1;

/// The IP address of `host` (services bind to an IP; an IPv4 one is preferred).
pub fn resolve(host: &str) -> Result<String> {
    use std::net::ToSocketAddrs;
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_string());
    }
    let addrs: Vec<std::net::SocketAddr> = (host, 0)
        .to_socket_addrs()
        .with_context(|| format!("--advertise {host}: cannot resolve it"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .map(|a| a.ip().to_string())
        .with_context(|| format!("--advertise {host}: no address"))
}

/// How this worker starts its processes.
#[derive(Clone)]
struct Launch {
    exe: PathBuf,
    /// The IP its services bind.
    host: String,
    /// Accelerators to share out, one per process while there are enough (each checked with
    /// [`device_env`]).
    devices: Vec<String>,
}

/// The environment that gives a process `device`, one of the worker's `--devices`: `cpu`
/// (`RLHF_DEVICE=cpu`), or `cuda:ID` with ID what `CUDA_VISIBLE_DEVICES` takes (a GPU's
/// number, or a `GPU-…`/`MIG-…` identifier): the process then sees that one GPU only, as its
/// `cuda:0` (`CUDA_VISIBLE_DEVICES=ID RLHF_DEVICE=cuda:0`).
pub fn device_env(device: &str) -> Result<Vec<(&'static str, String)>, String> {
    if device == "cpu" {
        return Ok(vec![("RLHF_DEVICE", "cpu".into())]);
    }
    match device.strip_prefix("cuda:") {
        Some(id)
            if !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'/') =>
        {
            Ok(vec![
                ("CUDA_VISIBLE_DEVICES", id.to_string()),
                ("RLHF_DEVICE", "cuda:0".into()),
            ])
        }
        _ => Err(format!(
            "`{device}` is not a device (expected `cpu` or `cuda:ID`, ID a GPU number or UUID, e.g. `cuda:0`)"
        )),
    }
}

/// The device for a new process: one no running process has, else the least used.
fn free_device(running: &Running, devices: &[String]) -> Option<String> {
    let used: Vec<Option<String>> = running
        .values()
        .map(|s| s.lock().expect("not poisoned").device.clone())
        .collect();
    devices
        .iter()
        .min_by_key(|d| used.iter().filter(|u| u.as_ref() == Some(*d)).count())
        .cloned()
}

/// One assigned process: its status as reported, and the process once started.
struct Slot {
    /// The device it was given (one of `--devices`, see [`device_env`]), if any.
    device: Option<String>,
    status: v1::AssignmentStatus,
    process: Option<ServiceProcess>,
    /// Taken away while it was starting: killed as soon as it is up.
    stopped: bool,
}

type Running = HashMap<String, Arc<Mutex<Slot>>>;

/// Runs the pool worker until it is killed or, with `idle_exit`, has had no assignment for that
/// long.
pub async fn run(
    coordinator: &str,
    mut register: v1::RegisterWorkerRequest,
    idle_exit: Option<Duration>,
) -> Result<()> {
    for d in &register.devices {
        device_env(d).map_err(|e| anyhow::anyhow!("--devices: {e}"))?;
    }
    register.address = resolve(&register.address)?;
    if register.role == "learner" {
        // Ports for data-parallel rings (bound and released, as the local launcher does).
        register.collective_ports = free_ports(&register.address, register.capacity as usize)?
            .iter()
            .map(|a| u32::from(a.port()))
            .collect();
    }
    let exe = rlhf_proto::process::self_exe().context("locating the rlhf binary")?;
    serve(coordinator, register, exe, idle_exit).await
}

/// Clients of every coordinator given (`URL[,URL…]`): a worker follows whichever answers, so
/// it keeps its work across a failover to a standby.
struct Coordinators {
    urls: Vec<String>,
    clients: Vec<WorkersClient>,
    current: usize,
}

impl Coordinators {
    fn new(list: &str) -> Result<Coordinators> {
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(10),
        };
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() {
            bail!("--coordinator: no address given");
        }
        let clients = urls
            .iter()
            .map(|u| {
                rlhf_proto::client::workers(u, timeouts)
                    .with_context(|| format!("coordinator address {u}"))
            })
            .collect::<Result<_>>()?;
        Ok(Coordinators {
            urls,
            clients,
            current: 0,
        })
    }

    fn client(&mut self) -> &mut WorkersClient {
        &mut self.clients[self.current]
    }

    fn url(&self) -> &str {
        &self.urls[self.current]
    }

    /// After a failed call: try the next coordinator.
    fn rotate(&mut self) {
        self.current = (self.current + 1) % self.urls.len();
    }
}

async fn serve(
    coordinator: &str,
    register: v1::RegisterWorkerRequest,
    exe: PathBuf,
    idle_exit: Option<Duration>,
) -> Result<()> {
    let mut coordinators = Coordinators::new(coordinator)?;
    let how = Launch {
        exe,
        host: register.address.clone(),
        devices: register.devices.clone(),
    };
    let mut running: Running = HashMap::new();
    let mut epochs = Epochs::default();
    loop {
        // The lease starts no earlier than the registration is sent.
        let asked = Instant::now();
        let reply = match coordinators.client().register(register.clone()).await {
            Ok(reply) => reply.into_inner(),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                bail!(
                    "the coordinator refused to register this worker: {}",
                    s.message()
                )
            }
            Err(s) => {
                tracing::warn!("registering with {}: {}", coordinators.url(), s.message());
                coordinators.rotate();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let id = reply.worker_id;
        // Announced on stdout, like the services' ready line, for whoever started us.
        println!("registered as {id} with {}", coordinators.url());
        eprintln!(
            "worker {id} ({}) registered with {}",
            register.role,
            coordinators.url()
        );
        let heartbeat = Duration::from_millis(reply.heartbeat_ms.max(100));
        let lease = Duration::from_millis(reply.lease_ttl_ms);
        // When the last heartbeat that got through was sent: the coordinator renewed the lease
        // after that, so from `last_ok + lease` on the worker is certainly given up on.
        let mut last_ok = asked;
        let mut idle_since = Instant::now();
        loop {
            let expiry = last_ok + lease;
            tokio::time::sleep(heartbeat.min(expiry.saturating_duration_since(Instant::now())))
                .await;
            if Instant::now() >= expiry {
                eprintln!(
                    "worker {id}: not heard for {lease:?}; its work was given away: stopping its processes and registering again"
                );
                stop_all(&mut running);
                let leave = v1::LeaveRequest { worker_id: id };
                let _ = tokio::time::timeout(heartbeat, coordinators.client().leave(leave)).await;
                break;
            }
            let statuses = refresh(&running);
            let request = v1::HeartbeatRequest {
                worker_id: id.clone(),
                statuses,
            };
            let sent = Instant::now();
            // No later than the lease's end, so a hung call cannot outlive it.
            let left = expiry
                .saturating_duration_since(sent)
                .max(Duration::from_millis(100));
            let call = coordinators.client().heartbeat(request);
            let answer = match tokio::time::timeout(left, call).await {
                Ok(answer) => answer,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {left:?}"
                ))),
            };
            match answer {
                Ok(reply) => {
                    last_ok = sent;
                    let reply = reply.into_inner();
                    epochs.see(reply.leader_epoch);
                    let assignments = epochs.admit(&running, reply.assignments);
                    reconcile(&mut running, assignments, &how);
                    // Idle means: the coordinator just said there is nothing to run.
                    if !running.is_empty() {
                        idle_since = Instant::now();
                    } else if let Some(idle) = idle_exit
                        && idle_since.elapsed() >= idle
                    {
                        eprintln!("worker {id}: idle for {idle:?}; leaving the pool");
                        let leave = v1::LeaveRequest { worker_id: id };
                        if let Err(s) = coordinators.client().leave(leave).await {
                            tracing::warn!("leaving: {} (the lease will expire)", s.message());
                        }
                        return Ok(());
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    eprintln!(
                        "worker {id}: the coordinator no longer knows it; stopping its processes and registering again"
                    );
                    stop_all(&mut running);
                    break;
                }
                Err(s) => {
                    tracing::warn!("heartbeat to {}: {}", coordinators.url(), s.message());
                    coordinators.rotate();
                }
            }
        }
    }
}

/// The newest leader epoch this worker has seen, and the assignments it refused for coming
/// from an older one (docs/reliability.md, fencing).
#[derive(Default)]
struct Epochs {
    newest: u64,
    refused: HashSet<(String, u64)>,
}

impl Epochs {
    fn see(&mut self, epoch: u64) {
        self.newest = self.newest.max(epoch);
    }

    /// The assignments to act on: what runs already at its generation is kept whatever its
    /// epoch (a new leader releases what it does not want), a new assignment or generation
    /// from a leader older than the newest seen is refused (said once).
    fn admit(
        &mut self,
        running: &Running,
        assignments: Vec<v1::Assignment>,
    ) -> Vec<v1::Assignment> {
        for a in &assignments {
            self.see(a.epoch);
        }
        let newest = self.newest;
        assignments
            .into_iter()
            .filter(|a| {
                let runs = running.get(&a.id).is_some_and(|slot| {
                    slot.lock().expect("not poisoned").status.generation == a.generation
                });
                if runs || a.epoch >= newest {
                    return true;
                }
                if self.refused.insert((a.id.clone(), a.generation)) {
                    eprintln!(
                        "refusing {} (generation {}): written by leader epoch {}, older than epoch {newest}",
                        a.id, a.generation, a.epoch
                    );
                }
                false
            })
            .collect()
    }
}

/// Marks processes that exited since the last look, and returns every status.
fn refresh(running: &Running) -> Vec<v1::AssignmentStatus> {
    running
        .values()
        .map(|slot| {
            let mut slot = slot.lock().expect("not poisoned");
            let exited = slot.process.as_mut().and_then(ServiceProcess::exit_status);
            if let Some(status) = exited {
                slot.process = None;
                slot.status.state = state::EXITED.into();
                slot.status.detail = format!("the process exited ({status})");
            }
            slot.status.clone()
        })
        .collect()
}

/// Stops what was taken away or has a new generation; starts what is new. A new generation's
/// process starts once its predecessor has exited (it may hold a ring port or the device).
fn reconcile(running: &mut Running, assignments: Vec<v1::Assignment>, how: &Launch) {
    let wanted: HashMap<&str, &v1::Assignment> =
        assignments.iter().map(|a| (a.id.as_str(), a)).collect();
    let mut replaced: HashMap<String, ServiceProcess> = HashMap::new();
    running.retain(|id, slot| {
        let keep = wanted
            .get(id.as_str())
            .is_some_and(|a| a.generation == slot.lock().expect("not poisoned").status.generation);
        if !keep {
            match (stop(slot), wanted.contains_key(id.as_str())) {
                (Some(old), true) => {
                    replaced.insert(id.clone(), old);
                }
                (Some(old), false) => kill_in_background(old),
                (None, _) => {}
            }
        }
        keep
    });
    for a in &assignments {
        if running.contains_key(&a.id) {
            continue;
        }
        let predecessor = replaced.remove(&a.id);
        let device = free_device(running, &how.devices);
        let slot = Arc::new(Mutex::new(Slot {
            device: device.clone(),
            status: v1::AssignmentStatus {
                id: a.id.clone(),
                generation: a.generation,
                state: state::STARTING.into(),
                url: String::new(),
                detail: String::new(),
                pid: 0,
            },
            process: None,
            stopped: false,
        }));
        running.insert(a.id.clone(), slot.clone());
        let (how, a) = (how.clone(), a.clone());
        eprintln!(
            "starting {} (generation {}{})",
            a.id,
            a.generation,
            device
                .as_deref()
                .map(|d| format!(", on {d}"))
                .unwrap_or_default()
        );
        tokio::task::spawn_blocking(move || {
            if let Some(mut old) = predecessor {
                old.kill();
            }
            let log = PathBuf::from(&a.log_path);
            let started =
                worker_process(&how.exe, &a.role, &a.args, &log, &how.host).and_then(|mut cmd| {
                    if let Some(d) = &device {
                        cmd.envs(device_env(d).map_err(std::io::Error::other)?);
                    }
                    let started = |pid| {
                        slot.lock().expect("not poisoned").status.pid = pid;
                    };
                    ServiceProcess::spawn_with(cmd, READY_TIMEOUT, started)
                });
            let mut slot = slot.lock().expect("not poisoned");
            match started {
                Ok(process) if slot.stopped => drop(process),
                Ok(process) => {
                    slot.status.state = state::READY.into();
                    slot.status.url = process.url();
                    slot.status.pid = process.id();
                    slot.process = Some(process);
                }
                Err(e) => {
                    slot.status.state = state::EXITED.into();
                    slot.status.detail = format!("{e:#} (log: {})", a.log_path);
                }
            }
        });
    }
}

/// Marks the slot stopped (a process still starting is killed at once); returns its running
/// process, for the caller to kill.
fn stop(slot: &Arc<Mutex<Slot>>) -> Option<ServiceProcess> {
    let mut slot = slot.lock().expect("not poisoned");
    slot.stopped = true;
    if slot.status.state == state::STARTING && slot.status.pid != 0 {
        // Still loading: killed now, not once it is ready (its replacement may need the device).
        #[cfg(unix)]
        // SAFETY: kill(2) has no memory effects. The pid is one this worker started; it is
        // reaped only if its start fails, just before the starting thread marks it exited, so
        // the one risk is a pid reused in that instant.
        unsafe {
            libc::kill(slot.status.pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let process = slot.process.take();
    if process.is_some() {
        eprintln!("stopping {}", slot.status.id);
    }
    process
}

/// Kills a process off the heartbeat loop (killing waits for the exit, and a GPU teardown can
/// take a while).
fn kill_in_background(mut p: ServiceProcess) {
    tokio::task::spawn_blocking(move || p.kill());
}

fn stop_all(running: &mut Running) {
    for slot in running.values() {
        if let Some(p) = stop(slot) {
            kill_in_background(p);
        }
    }
    running.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_of_an_older_leader_are_refused_unless_they_run_already() {
        let a = |id: &str, generation, epoch| v1::Assignment {
            id: id.into(),
            generation,
            epoch,
            ..Default::default()
        };
        let mut running: Running = HashMap::new();
        let runs = slot(None);
        runs.lock().unwrap().status.generation = 4;
        running.insert("j/actor-0".into(), runs);
        let mut epochs = Epochs::default();
        epochs.see(3);
        let ids = |v: Vec<v1::Assignment>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
        let admitted = epochs.admit(
            &running,
            vec![
                a("j/actor-0", 4, 2),   // runs already at this generation: kept
                a("j/learner-0", 1, 2), // new, from epoch 2 < 3: refused
                a("k/actor-0", 1, 3),   // new, current epoch
            ],
        );
        assert_eq!(ids(admitted), ["j/actor-0", "k/actor-0"]);
        // A newer epoch on an assignment raises the bar for the rest of the reply.
        let admitted = epochs.admit(&running, vec![a("k/actor-1", 1, 3), a("m/actor-0", 1, 5)]);
        assert_eq!(ids(admitted), ["m/actor-0"]);
        assert_eq!(epochs.newest, 5);
    }

    fn slot(device: Option<&str>) -> Arc<Mutex<Slot>> {
        Arc::new(Mutex::new(Slot {
            device: device.map(String::from),
            status: v1::AssignmentStatus::default(),
            process: None,
            stopped: false,
        }))
    }

    #[test]
    fn a_gpu_is_the_only_one_its_process_sees_as_cuda_0() {
        let env = |d: &str| device_env(d).unwrap();
        assert_eq!(
            env("cuda:3"),
            [
                ("CUDA_VISIBLE_DEVICES", "3".to_string()),
                ("RLHF_DEVICE", "cuda:0".to_string())
            ]
        );
        assert_eq!(
            env("cuda:GPU-8f2e-11aa")[0],
            ("CUDA_VISIBLE_DEVICES", "GPU-8f2e-11aa".to_string())
        );
        assert_eq!(
            env("cuda:MIG-GPU-8f2e/1/0")[0].1,
            "MIG-GPU-8f2e/1/0",
            "an old-style MIG instance"
        );
        assert_eq!(env("cpu"), [("RLHF_DEVICE", "cpu".to_string())]);
        for bad in ["3", "gpu:0", "cuda:", "cuda:0,1", "CPU", "cuda: 1"] {
            let e = device_env(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    #[test]
    fn devices_are_shared_out_one_per_process_then_evenly() {
        let devices = vec!["cuda:0".to_string(), "cuda:1".to_string()];
        let mut running = Running::new();
        assert_eq!(free_device(&running, &[]), None);
        assert_eq!(free_device(&running, &devices).as_deref(), Some("cuda:0"));
        running.insert("a".into(), slot(Some("cuda:0")));
        assert_eq!(free_device(&running, &devices).as_deref(), Some("cuda:1"));
        running.insert("b".into(), slot(Some("cuda:1")));
        running.insert("c".into(), slot(Some("cuda:0")));
        assert_eq!(free_device(&running, &devices).as_deref(), Some("cuda:1"));
    }
}
