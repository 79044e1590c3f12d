//! Hosts that are really separate: Linux network namespaces, one per "host", each with its own
//! address on a private bridge, for end-to-end tests of a cluster spread over machines
//! (`tests/tests/hosts.rs`).
//!
//! Layout of one [`Hosts`]: a namespace holding only a bridge (`br0`), and per host a namespace
//! with `lo` up and one veth pair: `eth0` inside the host (its address, `10.X.Y.(10+i)/24`) and
//! `vI` on the bridge. The root namespace is never touched, so two tests (or two test processes)
//! that happened to pick the same subnet could not see each other either; the subnet is still
//! chosen per test (pid and a counter) and away from every route of the root namespace, so
//! addresses in a failing test's logs are unambiguous. Namespaces share the filesystem, as
//! machines on a shared filesystem do: a job's output folder is seen at the same path
//! everywhere.
//!
//! A process runs inside a host through [`Host::command`] (`ip netns exec NAME PROGRAM`, which
//! execs the program: the child's pid is the program's). A host's link is cut with
//! [`Host::link_down`] (the bridge side of its veth goes down: packets to and from it are
//! dropped silently, as with a pulled cable, rather than refused) and restored with
//! [`Host::link_up`]. [`Host::kill_all`] kills every process in the namespace at once, as a
//! machine that loses power. Dropping [`Hosts`] (also while a test panics) kills whatever runs
//! in its namespaces and removes them with their links; namespaces left behind by a test process
//! that was itself killed are removed by the next [`Hosts::new`].
//!
//! Needs root and `ip` (iproute2). [`Hosts::for_test`] skips a test with a clear message where
//! namespaces cannot be made, unless `RLHF_REQUIRE_NETNS=1` (CI), where it fails instead.
//!
//! [`Cluster`] puts the system's processes on hosts: etcd, coordinators, pool workers, and the
//! `rlhf` CLI, each with the security settings of [`Security`] (one place for every process's
//! TLS/token environment and arguments).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rlhf_proto::process::ServiceProcess;

use crate::bin;

/// The prefix of every namespace this harness makes (`rlhf-PID-N-…`), so stale ones can be
/// found and removed.
const PREFIX: &str = "rlhf-";

/// Set to `1` where the namespace tests must run (CI): a test that cannot make namespaces then
/// fails instead of skipping.
pub const REQUIRE_ENV: &str = "RLHF_REQUIRE_NETNS";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ip ARGS` where failing is fine (cleanup).
fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The pids of every process in namespace `ns` (`ip netns pids`).
fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in `ns` until none is left (one forking while it is killed is caught
/// by the next round); true when the namespace is empty.
fn kill_namespace(ns: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = netns_pids(ns);
        if pids.is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("netns {ns}: processes {pids:?} survive SIGKILL");
            return false;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes namespaces of this harness whose test process is gone (it was killed before its
/// `Hosts` could be dropped).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace(name);
            ip_quiet(&["netns", "del", name]);
        }
    }
}

/// Whether route destination `dst` (`A.B.C.D/LEN` or `A.B.C.D`, as `ip route` prints it)
/// overlaps the /24 `net`. `default` does not count: it routes everything, uses nothing.
fn overlaps(dst: &str, net: [u8; 3]) -> bool {
    let (ip, len) = dst.split_once('/').unwrap_or((dst, "32"));
    let (Ok(ip), Ok(len)) = (ip.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    let bits = len.min(24);
    if bits == 0 {
        return false;
    }
    let mask = u32::MAX << (32 - bits);
    let ours = u32::from(Ipv4Addr::new(net[0], net[1], net[2], 0));
    (u32::from(ip) & mask) == (ours & mask)
}

/// The first `10.X.Y.0/24` (X in 64..128 from the pid, Y from a per-process counter) that no
/// route of the root namespace overlaps.
fn pick_subnet(serial: u32) -> [u8; 3] {
    let routes = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let x = 64 + (std::process::id() % 64) as u8;
    (0..256u32)
        .map(|k| [10, x, ((serial + k) % 256) as u8])
        .find(|&net| {
            !routes.lines().any(|r| {
                // `local 10.1.2.3 dev …`, `broadcast …`: the destination follows the type.
                let mut f = r.split_whitespace();
                let first = f.next().unwrap_or("");
                let dst = match first {
                    "local" | "broadcast" | "unicast" | "multicast" | "anycast" => {
                        f.next().unwrap_or("")
                    }
                    _ => first,
                };
                overlaps(dst, net)
            })
        })
        .unwrap_or_else(|| panic!("no free 10.{x}.Y.0/24: every one is routed on this machine"))
}

/// One host: a network namespace with its own address.
pub struct Host {
    ns: String,
    label: String,
    addr: Ipv4Addr,
    bridge_ns: String,
    bridge_port: String,
}

/// A process listening in a host (`ss -ltunp`).
#[derive(Debug, Clone)]
pub struct Listener {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The local address as `ss` prints it (`10.64.3.11:2379`, `127.0.0.1:53`, `*:80`,
    /// `[::]:80`, `0.0.0.0:80`).
    pub local: String,
    /// `users:(("etcd",pid=12,fd=7))`.
    pub process: String,
}

impl Listener {
    /// The IP part of [`Listener::local`] (`*`, `[::]` and `0.0.0.0` for every interface).
    pub fn ip(&self) -> &str {
        self.local
            .rsplit_once(':')
            .map_or(self.local.as_str(), |(ip, _)| ip)
    }
}

impl Host {
    /// Its name (`host-I`): the worker node name and the certificate name.
    pub fn name(&self) -> &str {
        &self.label
    }

    /// The network namespace's name (`ip netns exec NAME …`).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// Its address on the bridge.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `program` run inside this host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Cuts the host off the network: its port on the bridge goes down, so what it sends and
    /// what is sent to it is dropped without an answer (connections time out; nothing is
    /// refused). Its own loopback keeps working.
    pub fn link_down(&self) {
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &self.bridge_port,
            "down",
        ]);
    }

    /// Restores what [`Host::link_down`] cut.
    pub fn link_up(&self) {
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &self.bridge_port,
            "up",
        ]);
    }

    /// The pids of every process running in this host.
    pub fn pids(&self) -> Vec<u32> {
        netns_pids(&self.ns)
    }

    /// Every process in this host with its command line (arguments joined by spaces).
    pub fn processes(&self) -> Vec<(u32, String)> {
        self.pids()
            .into_iter()
            .filter_map(|pid| {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<String> = raw
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                Some((pid, args.join(" ")))
            })
            .collect()
    }

    /// Kills every process in the host at once (SIGKILL), as a machine that loses power; returns
    /// how many there were.
    pub fn kill_all(&self) -> usize {
        let n = self.pids().len();
        assert!(
            kill_namespace(&self.ns),
            "{}: processes survive",
            self.label
        );
        n
    }

    /// The sockets listening in this host, TCP and UDP (`ss -Hltunp` inside it).
    pub fn listeners(&self) -> Vec<Listener> {
        let out = self
            .command("ss")
            .args(["-H", "-l", "-t", "-u", "-n", "-p"])
            .output()
            .expect("`ss` (iproute2) runs");
        assert!(
            out.status.success(),
            "ss in {}: {}",
            self.label,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // Netid State Recv-Q Send-Q Local Peer [Process]
                (f.len() >= 6).then(|| Listener {
                    protocol: f[0].to_string(),
                    local: f[4].to_string(),
                    process: f.get(6..).map(|p| p.join(" ")).unwrap_or_default(),
                })
            })
            .collect()
    }
}

/// Several hosts on one bridge; everything is removed on drop.
pub struct Hosts {
    bridge_ns: String,
    hosts: Vec<Host>,
}

impl std::ops::Deref for Hosts {
    type Target = [Host];
    fn deref(&self) -> &[Host] {
        &self.hosts
    }
}

impl Hosts {
    /// Whether namespaces can be made here: root, `ip` present, and a probe namespace can be
    /// created (a container may deny it even to root). Err says why not.
    pub fn available() -> Result<(), String> {
        static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
        PROBE
            .get_or_init(|| {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let uid = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("?");
                if uid != "0" {
                    return Err(format!(
                        "network namespaces need root (effective uid {uid})"
                    ));
                }
                match Command::new("ip").arg("-V").output() {
                    Ok(o) if o.status.success() => {}
                    _ => return Err("`ip` (iproute2) is not installed".into()),
                }
                let probe = format!("{PREFIX}{}-probe", std::process::id());
                let made = Command::new("ip")
                    .args(["netns", "add", &probe])
                    .output()
                    .map_err(|e| format!("running `ip netns add`: {e}"))?;
                if !made.status.success() {
                    return Err(format!(
                        "`ip netns add` fails here: {}",
                        String::from_utf8_lossy(&made.stderr).trim()
                    ));
                }
                ip_quiet(&["netns", "del", &probe]);
                Ok(())
            })
            .clone()
    }

    /// `n` hosts for `test`, or None (with a message on stderr) where namespaces cannot be
    /// made; with `RLHF_REQUIRE_NETNS=1` that is a failure instead.
    pub fn for_test(test: &str, n: usize) -> Option<Hosts> {
        match Hosts::available() {
            Ok(()) => Some(Hosts::new(n)),
            Err(why) if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") => {
                panic!("{test}: {why}, and {REQUIRE_ENV}=1 requires the namespace tests to run")
            }
            Err(why) => {
                eprintln!(
                    "SKIPPED {test}: {why} (run as root to test across hosts; {REQUIRE_ENV}=1 makes this a failure)"
                );
                None
            }
        }
    }

    /// `n` hosts (`host-0` … `host-{n-1}`) on a fresh bridge and subnet.
    pub fn new(n: usize) -> Hosts {
        assert!((1..=200).contains(&n), "1 to 200 hosts, not {n}");
        remove_stale();
        let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{serial}", std::process::id());
        let subnet = pick_subnet(serial);
        let bridge_ns = format!("{base}-br");
        // From here on, a failure still removes what was made (Drop).
        let mut hosts = Hosts {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &bridge_ns]);
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{base}-h{i}");
            let port = format!("v{i}");
            let addr = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 10 + i as u8);
            ip(&["netns", "add", &ns]);
            hosts.hosts.push(Host {
                ns: ns.clone(),
                label: format!("host-{i}"),
                addr,
                bridge_ns: bridge_ns.clone(),
                bridge_port: port.clone(),
            });
            // Both ends are made in their namespaces (names only need to be unique there).
            ip(&[
                "-n", &bridge_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &bridge_ns, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &bridge_ns, "link", "set", &port, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// Asserts that every socket listening in any host is on that host's own address, or on
    /// 127.0.0.1 for what is purely local — none on every interface (`0.0.0.0`, `*`, `[::]`)
    /// by accident, none on another host's address. Returns every listener seen, by host.
    pub fn assert_listeners_on_own_addresses(&self) -> Vec<(String, Listener)> {
        let mut all = Vec::new();
        let mut wrong = Vec::new();
        for h in &self.hosts {
            let own = h.addr.to_string();
            for l in h.listeners() {
                if l.ip() != own && l.ip() != "127.0.0.1" {
                    wrong.push(format!(
                        "{} ({own}): {} {} {}",
                        h.label, l.protocol, l.local, l.process
                    ));
                }
                all.push((h.label.clone(), l));
            }
        }
        assert!(
            wrong.is_empty(),
            "sockets listening beyond their host's own address:\n{}",
            wrong.join("\n")
        );
        all
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_namespace(&h.ns);
            if !ip_quiet(&["netns", "del", &h.ns]) {
                eprintln!("could not remove netns {}", h.ns);
            }
        }
        // The veth pairs went with the host namespaces; the bridge goes with its own.
        kill_namespace(&self.bridge_ns);
        ip_quiet(&["netns", "del", &self.bridge_ns]);
    }
}

/// Who a process is, for the credentials it is given ([`Security::env`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// A coordinator: presents the join token to the services it drives.
    Coordinator,
    /// A pool worker (and the services it starts): the join token.
    Worker,
    /// The CLI for reads (`status`, `jobs`, `workers`, `logs`).
    Reader,
    /// The CLI for `submit` and `cancel`.
    Submitter,
}

/// The security settings of every process of a test cluster, in one place (docs/security.md).
///
/// Secure (TLS certificates per host from `rlhf certs`, tokens from `rlhf tokens`) when this
/// `rlhf` has those commands; until then plaintext with `RLHF_INSECURE=1`, which a process
/// listening beyond loopback needs to start without TLS and tokens.
pub struct Security {
    dir: PathBuf,
    secure: bool,
    allow: Vec<PathBuf>,
}

/// Whether this `rlhf` binary can make certificates (`rlhf certs`).
pub fn rlhf_has_certs() -> bool {
    Command::new(bin("rlhf"))
        .args(["certs", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Security {
    /// Makes the material in `dir` for `hosts` (a CA and a certificate for each host's name
    /// and address, and the token files), when `rlhf certs` exists. A coordinator may touch
    /// only `allow` (and its state directory) in secure mode.
    pub fn new(dir: &Path, hosts: &[Host], allow: &[&Path]) -> Security {
        std::fs::create_dir_all(dir).unwrap();
        let secure = rlhf_has_certs();
        if secure {
            for h in hosts {
                let addr = h.addr.to_string();
                crate::rlhf_ok(&[
                    "certs",
                    "--out",
                    dir.to_str().unwrap(),
                    "--name",
                    h.name(),
                    "--san",
                    &addr,
                ]);
            }
            crate::rlhf_ok(&["tokens", "--out", dir.to_str().unwrap()]);
        }
        Security {
            dir: dir.to_path_buf(),
            secure,
            allow: allow.iter().map(|p| p.to_path_buf()).collect(),
        }
    }

    /// Whether processes run with TLS and tokens.
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// The environment of a process of kind `who` on `host`.
    pub fn env(&self, host: &Host, who: Who) -> Vec<(String, String)> {
        if !self.secure {
            return vec![("RLHF_INSECURE".into(), "1".into())];
        }
        let file = |name: &str| self.dir.join(name).display().to_string();
        let token = match who {
            Who::Coordinator | Who::Worker => "join.token",
            Who::Reader => "read.token",
            Who::Submitter => "submit.token",
        };
        vec![
            ("RLHF_TLS_CA".into(), file("ca.pem")),
            (
                "RLHF_TLS_CERT".into(),
                file(&format!("{}.pem", host.name())),
            ),
            ("RLHF_TLS_KEY".into(), file(&format!("{}.key", host.name()))),
            ("RLHF_TOKEN_FILE".into(), file(token)),
        ]
    }

    /// A coordinator's extra arguments: its token table and the paths jobs may touch.
    pub fn coordinator_args(&self) -> Vec<String> {
        if !self.secure {
            return Vec::new();
        }
        let mut args = vec![
            "--tokens".to_string(),
            self.dir.join("tokens").display().to_string(),
        ];
        for p in &self.allow {
            args.push("--allow-path".into());
            args.push(p.display().to_string());
        }
        args
    }
}

/// A child process in a host, killed (and reaped) on drop.
pub struct Proc {
    child: Child,
    /// What it is, for messages (`etcd on host-0`).
    pub what: String,
}

impl Proc {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator in a host.
pub struct CoordinatorProc {
    pub process: ServiceProcess,
    /// `IP:PORT` it listens on.
    pub address: String,
    pub what: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl CoordinatorProc {
    /// `http://IP:PORT` (clients with `RLHF_TLS_CA` set speak TLS to it).
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Whether it has won the election (its log says `coordinator NAME is active`; read from
    /// the log rather than its `/metrics`, which is behind TLS in secure mode).
    pub fn elected(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(" is active"))
    }
}

/// The system's processes on [`Hosts`]: every one started here gets its host's [`Security`]
/// settings and a log file `<dir>/logs/<host>-<what>.log`.
pub struct Cluster {
    pub security: Security,
    logs: PathBuf,
    /// The job files and outputs (shared by every host).
    pub dir: PathBuf,
}

/// The port a coordinator listens on inside its host (each host has its own ports).
pub const COORDINATOR_PORT: u16 = 50070;
/// etcd's client port inside its host.
pub const ETCD_PORT: u16 = 2379;

impl Cluster {
    /// A cluster whose files are under `dir` (the test's temporary folder); jobs may touch
    /// `dir` and the fixtures.
    pub fn new(hosts: &Hosts, dir: &Path) -> Cluster {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let fixtures = crate::fixtures();
        let security = Security::new(&dir.join("security"), hosts, &[dir, &fixtures]);
        eprintln!(
            "cluster on {} hosts: {}",
            hosts.len(),
            if security.is_secure() {
                "TLS and tokens (rlhf certs, rlhf tokens)"
            } else {
                "plaintext with RLHF_INSECURE=1 (this rlhf has no `certs` command)"
            }
        );
        Cluster {
            security,
            logs,
            dir: dir.to_path_buf(),
        }
    }

    fn log_path(&self, host: &Host, what: &str) -> PathBuf {
        self.logs.join(format!("{}-{what}.log", host.name()))
    }

    fn log(&self, host: &Host, what: &str) -> std::fs::File {
        let path = self.log_path(host, what);
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The last `lines` lines of every log, for a failing test's message: the processes' own
    /// (`<dir>/logs/`) and the jobs' (`<output>/logs/*.log`, anywhere under `dir`).
    pub fn log_tails(&self, lines: usize) -> String {
        fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.is_dir() && depth > 0 {
                    walk(&path, depth - 1, out);
                } else if path.extension().is_some_and(|x| x == "log") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.dir, 4, &mut files);
        files.sort();
        let mut out = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out += &format!("== {}\n{}\n", f.display(), tail.join("\n"));
        }
        out
    }

    /// etcd inside `host`, on its address only (client and peer ports); returns it and its
    /// `IP:PORT` client endpoint.
    pub fn etcd(&self, host: &Host) -> (Proc, String) {
        let data = self.dir.join(format!("etcd-{}", host.name()));
        let client = format!("http://{}:{ETCD_PORT}", host.addr());
        let peer = format!("http://{}:{}", host.addr(), ETCD_PORT + 1);
        let child = host
            .command("etcd")
            .args(["--name", host.name(), "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{}={peer}", host.name())])
            .stdout(Stdio::null())
            .stderr(self.log(host, "etcd"))
            .spawn()
            .expect("`etcd` on PATH (Debian: apt-get install etcd-server; .ci/run does)");
        (
            Proc {
                child,
                what: format!("etcd on {}", host.name()),
            },
            format!("{}:{ETCD_PORT}", host.addr()),
        )
    }

    /// `rlhf coordinator --launcher static` inside `host` on its address, named `name`, with
    /// `store`, its state in `<dir>/state` (shared, like the job outputs), plus `extra`.
    pub fn coordinator(
        &self,
        host: &Host,
        store: &str,
        name: &str,
        extra: &[&str],
    ) -> CoordinatorProc {
        let listen = format!("{}:{COORDINATOR_PORT}", host.addr());
        let log = self.log_path(host, &format!("coordinator-{name}"));
        let mut cmd = host.command(bin("rlhf"));
        cmd.envs(self.security.env(host, Who::Coordinator))
            .env_remove("RLHF_DEVICE")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(["coordinator", "--launcher", "static", "--listen", &listen])
            .args(["--store", store, "--name", name, "--state-dir"])
            .arg(self.dir.join(format!("state-{name}")))
            .args(self.security.coordinator_args())
            .args(extra)
            .stderr(self.log(host, &format!("coordinator-{name}")));
        let what = format!("coordinator {name} on {}", host.name());
        let process = ServiceProcess::spawn(cmd, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what} starts: {e}\n{}", self.log_tails(20)));
        let address = process.address.to_string();
        assert_eq!(
            address, listen,
            "{what} listens where it was told to, not elsewhere"
        );
        CoordinatorProc {
            process,
            address,
            what,
            log,
        }
    }

    /// A pool worker inside `host`: `rlhf worker --role ROLE --coordinator URLS --node HOST
    /// --advertise HOST_IP --capacity N`.
    pub fn worker(&self, host: &Host, coordinators: &str, role: &str, capacity: u32) -> Proc {
        let addr = host.addr().to_string();
        let child = host
            .command(bin("rlhf"))
            .envs(self.security.env(host, Who::Worker))
            .env_remove("RLHF_DEVICE")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(["worker", "--role", role, "--coordinator", coordinators])
            .args(["--node", host.name(), "--advertise", &addr])
            .args(["--capacity", &capacity.to_string()])
            .stdout(Stdio::null())
            .stderr(self.log(host, &format!("{role}-worker")))
            .spawn()
            .unwrap();
        Proc {
            child,
            what: format!("{role} worker on {}", host.name()),
        }
    }

    /// One pool worker per `(host index, role)` in `placed`, each with `capacity`.
    pub fn workers(
        &self,
        hosts: &[Host],
        coordinators: &str,
        placed: &[(usize, &str)],
        capacity: u32,
    ) -> Vec<Proc> {
        placed
            .iter()
            .map(|&(h, role)| self.worker(&hosts[h], coordinators, role, capacity))
            .collect()
    }

    /// The `rlhf` CLI inside `host`, talking to the coordinator at `url`.
    pub fn cli<'a>(&'a self, host: &'a Host, url: &str) -> Cli<'a> {
        Cli {
            cluster: self,
            host,
            url: url.to_string(),
        }
    }
}

/// The `rlhf` cluster CLI run inside one host.
pub struct Cli<'a> {
    cluster: &'a Cluster,
    host: &'a Host,
    /// The coordinator it talks to.
    pub url: String,
}

impl Cli<'_> {
    fn command(&self, who: Who) -> Command {
        let mut cmd = self.host.command(bin("rlhf"));
        cmd.envs(self.cluster.security.env(self.host, who))
            .env("RLHF_COORDINATOR", &self.url)
            .env("RUST_LOG", "warn");
        cmd
    }

    /// `rlhf ARGS` (a read); its output whatever the outcome.
    pub fn try_run(&self, args: &[&str]) -> Output {
        self.command(Who::Reader).args(args).output().unwrap()
    }

    /// `rlhf ARGS` (a read); asserts success.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "rlhf {args:?} on {} against {}: {}",
            self.host.name(),
            self.url,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Submits `job` from its folder (a relative path, as users type it); the job id.
    pub fn submit(&self, job: &Path) -> String {
        let out = self
            .command(Who::Submitter)
            .args(["submit", job.file_name().unwrap().to_str().unwrap()])
            .current_dir(job.parent().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rlhf submit {} on {}: {}",
            job.display(),
            self.host.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// `rlhf status ID --json`; None when the coordinator does not answer.
    pub fn try_status(&self, id: &str) -> Option<serde_json::Value> {
        let out = self.try_run(&["status", id, "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// `rlhf status ID --json`.
    pub fn status(&self, id: &str) -> serde_json::Value {
        serde_json::from_slice(&self.run(&["status", id, "--json"]).stdout).unwrap()
    }

    /// The job's last applied step (0 before the first, or while the coordinator is away).
    pub fn step(&self, id: &str) -> u64 {
        self.try_status(id)
            .and_then(|s| s["last_step"].as_u64())
            .unwrap_or(0)
    }

    /// `rlhf workers --json`.
    pub fn workers(&self) -> Vec<serde_json::Value> {
        serde_json::from_slice(&self.run(&["workers", "--json"]).stdout).unwrap()
    }

    /// The worker running assignment `<job>/<name>`, and that assignment.
    pub fn assignment(
        &self,
        job: &str,
        name: &str,
    ) -> Option<(serde_json::Value, serde_json::Value)> {
        let id = format!("{job}/{name}");
        self.workers().into_iter().find_map(|w| {
            let a = w["assignments"]
                .as_array()?
                .iter()
                .find(|a| a["id"] == id.as_str())
                .cloned()?;
            Some((w, a))
        })
    }

    /// Waits until `f` holds (polling every 200 ms); on timeout, or as soon as job `id` (if
    /// not empty) has failed, fails with `what`, the job's status, the pool and the tails of
    /// every log.
    pub fn wait(&self, id: &str, what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        let mut polls = 0u32;
        while !f() {
            polls += 1;
            // About once a second: a failed job will not get there.
            let failed = !id.is_empty()
                && polls.is_multiple_of(5)
                && self.try_status(id).is_some_and(|s| s["state"] == "failed");
            if failed || Instant::now() > deadline {
                let workers = self.try_run(&["workers", "--json"]);
                let why = if failed {
                    "the job failed".to_string()
                } else {
                    format!("timed out after {within:?}")
                };
                panic!(
                    "{why} waiting for {what}\njob: {}\nworkers: {}\nlogs:\n{}",
                    self.try_status(id).unwrap_or_default(),
                    String::from_utf8_lossy(&workers.stdout),
                    self.cluster.log_tails(15)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until job `id` is in `state`, failing at once if it failed instead.
    pub fn wait_state(&self, id: &str, state: &str, within: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        self.wait(id, &format!("{id} to be {state}"), within, || {
            if let Some(s) = self.try_status(id) {
                last = s;
            }
            assert!(
                !(last["state"] == "failed" && state != "failed"),
                "{id} failed: {last}\nlogs:\n{}",
                self.cluster.log_tails(15)
            );
            last["state"] == state
        });
        last
    }

    /// Waits until `n` workers are registered.
    pub fn wait_workers(&self, n: usize, within: Duration) {
        self.wait("", &format!("{n} workers"), within, || {
            self.workers().len() == n
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_overlaps_a_subnet_when_their_common_prefix_agrees() {
        let net = [10, 70, 3];
        for yes in [
            "10.70.3.0/24",
            "10.70.3.7",
            "10.0.0.0/8",
            "10.70.0.0/16",
            "10.70.3.128/25",
        ] {
            assert!(overlaps(yes, net), "{yes}");
        }
        for no in [
            "default",
            "10.70.4.0/24",
            "192.0.2.0/24",
            "10.71.0.0/16",
            "fe80::/64",
            "x",
        ] {
            assert!(!overlaps(no, net), "{no}");
        }
    }

    #[test]
    fn a_listener_s_ip_is_its_address_without_the_port() {
        let l = |local: &str| Listener {
            protocol: "tcp".into(),
            local: local.into(),
            process: String::new(),
        };
        assert_eq!(l("10.70.3.11:2379").ip(), "10.70.3.11");
        assert_eq!(l("[::]:80").ip(), "[::]");
        assert_eq!(l("*:80").ip(), "*");
        assert_eq!(l("0.0.0.0:5").ip(), "0.0.0.0");
    }
}
