//! Child service processes: start a binary, wait for its `listening on ADDR` line, kill it on
//! drop. Used by the local launcher and by tests that need real processes.

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
