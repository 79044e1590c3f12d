//! Child service processes: start a binary, wait for its `listening on ADDR` line, kill it on
//! drop. Used by the local launcher, the pool workers and tests that need real processes.
//! [`worker_process`] is the one way any launcher starts a service (`rlhf worker --role R --
//! ARGS --listen HOST:0`), so the coordinator's local launcher and a pool worker on another
//! machine start exactly the same command.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running service process.
pub struct ServiceProcess {
    child: Child,
    /// The address it reported.
    pub address: SocketAddr,
}

/// The line every service prints on stdout once it accepts connections.
pub const READY_PREFIX: &str = "listening on ";

/// How long a service may take to load its model and print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// What a pool worker reports about an assignment's process (`AssignmentStatus.state`).
pub mod assignment_state {
    /// Placed, not reported on yet by its worker (listings only).
    pub const ASSIGNED: &str = "assigned";
    /// Being started (loading its model).
    pub const STARTING: &str = "starting";
    /// Serving at its URL.
    pub const READY: &str = "ready";
    /// Exited or failed to start (the detail says why).
    pub const EXITED: &str = "exited";
}

/// `n` distinct ports free on `host` now (all bound at once, then released).
pub fn free_ports(host: &str, n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((host, 0)))
        .collect::<std::io::Result<_>>()
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("finding {n} free ports on {host}: {e}"))
        })?;
    listeners
        .iter()
        .map(std::net::TcpListener::local_addr)
        .collect()
}

/// The process `EXE worker --role ROLE -- ARGS --listen HOST:0`, its stderr appended to
/// `log_path` (the local launcher and pool workers both start services this way).
pub fn worker_process(
    exe: &std::path::Path,
    role: &str,
    args: &[String],
    log_path: &std::path::Path,
    host: &str,
) -> std::io::Result<Command> {
    let context = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).map_err(context(format!("creating {}", dir.display())))?;
    }
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(context(format!("opening {}", log_path.display())))?;
    let mut cmd = Command::new(exe);
    cmd.args(["worker", "--role", role, "--"])
        .args(args)
        .arg("--listen")
        .arg(format!("{host}:0"))
        .stderr(log);
    Ok(cmd)
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// This binary, for starting workers. On Linux `/proc/self/exe` names the running image even
/// after the file was replaced (a rebuild during a long run), so workers started late in a
/// run execute the same code as their launcher.
pub fn self_exe() -> std::io::Result<std::path::PathBuf> {
    let proc = std::path::PathBuf::from("/proc/self/exe");
    if proc.exists() {
        return Ok(proc);
    }
    std::env::current_exe()
}

impl ServiceProcess {
    /// Starts `command` and waits up to `ready_timeout` for its ready line. The rest of its
    /// stdout is drained in the background; stderr is inherited.
    pub fn spawn(command: Command, ready_timeout: Duration) -> std::io::Result<ServiceProcess> {
        Self::spawn_with(command, ready_timeout, |_| {})
    }

    /// [`ServiceProcess::spawn`], telling `on_start` the process id as soon as it runs (so a
    /// caller can kill a process that is still starting).
    pub fn spawn_with(
        mut command: Command,
        ready_timeout: Duration,
        on_start: impl FnOnce(u32),
    ) -> std::io::Result<ServiceProcess> {
        let program = format!("{:?}", command.get_program());
        let mut child = command
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?;
        on_start(child.id());
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(addr) = line.trim().strip_prefix(READY_PREFIX) {
                    let _ = tx.send(addr.parse::<SocketAddr>());
                    sent = true;
                }
            }
        });
        let fail = |child: &mut Child, message: String| {
            let _ = child.kill();
            let _ = child.wait();
            std::io::Error::other(message)
        };
        match rx.recv_timeout(ready_timeout) {
            Ok(Ok(address)) => Ok(ServiceProcess { child, address }),
            Ok(Err(e)) => Err(fail(&mut child, format!("{program}: bad ready line: {e}"))),
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                Err(fail(
                    &mut child,
                    format!(
                        "{program}: not ready within {ready_timeout:?} (exit status: {status:?})"
                    ),
                ))
            }
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The OS process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it has exited.
    pub fn has_exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// How it exited, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
