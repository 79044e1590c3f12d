//! TLS and bearer tokens for every endpoint and every client (docs/security.md): one
//! configuration per process, read from the environment once ([`current`]), used by
//! [`crate::client`] for every channel and by [`crate::service::ServiceHost`] for every server.

pub mod auth;
pub mod certs;
pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use tokens::{Need, Role, TokenTable};

/// The environment every process reads (the `rlhf` CLI's global flags set the same variables).
pub mod env {
    pub const TLS_CA: &str = "RLHF_TLS_CA";
    pub const TLS_CERT: &str = "RLHF_TLS_CERT";
    pub const TLS_KEY: &str = "RLHF_TLS_KEY";
    pub const TLS_CLIENT_AUTH: &str = "RLHF_TLS_CLIENT_AUTH";
    pub const TOKEN: &str = "RLHF_TOKEN";
    pub const TOKEN_FILE: &str = "RLHF_TOKEN_FILE";
    pub const INSECURE: &str = "RLHF_INSECURE";
}

/// A process's TLS material, loaded.
#[derive(Clone)]
pub struct Tls {
    ca: Certificate,
    identity: Option<Identity>,
    client_auth: bool,
    /// Where the certificate came from, for messages.
    cert_file: Option<PathBuf>,
}

/// How this process secures what it serves and what it calls.
#[derive(Clone, Default)]
pub struct Security {
    /// TLS for servers and clients; `None`: plaintext.
    pub tls: Option<Tls>,
    /// The token this process presents on every call.
    pub token: Option<String>,
    /// The tokens its servers accept; `None`: no authentication.
    pub accepts: Option<TokenTable>,
    /// Listening beyond loopback without TLS and tokens was allowed explicitly.
    pub insecure: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("accepts", &self.accepts)
            .field("insecure", &self.insecure)
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn flag(name: &str) -> Result<bool, String> {
    match std::env::var(name).ok().as_deref().map(str::trim) {
        None | Some("") | Some("0") | Some("false") => Ok(false),
        Some("1") | Some("true") => Ok(true),
        Some(other) => Err(format!("{name}={other:?}: expected 1 or 0")),
    }
}

fn path_var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

impl Tls {
    /// Loads `ca` and, when given, this process's certificate and key.
    pub fn load(
        ca: &Path,
        cert_key: Option<(&Path, &Path)>,
        client_auth: bool,
    ) -> Result<Tls, String> {
        let ca_pem = read(ca, env::TLS_CA)?;
        if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "{} {}: no PEM certificate in it",
                env::TLS_CA,
                ca.display()
            ));
        }
        let identity = match cert_key {
            Some((cert, key)) => {
                let cert_pem = read(cert, env::TLS_CERT)?;
                let key_pem = read(key, env::TLS_KEY)?;
                if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!(
                        "{} {}: no PEM certificate in it",
                        env::TLS_CERT,
                        cert.display()
                    ));
                }
                if !key_pem.contains("PRIVATE KEY-----") {
                    return Err(format!(
                        "{} {}: no PEM private key in it",
                        env::TLS_KEY,
                        key.display()
                    ));
                }
                Some(Identity::from_pem(cert_pem, key_pem))
            }
            None => None,
        };
        Ok(Tls {
            ca: Certificate::from_pem(ca_pem),
            identity,
            client_auth,
            cert_file: cert_key.map(|(c, _)| c.to_path_buf()),
        })
    }

    /// A server's TLS: its certificate, and the CA its clients' certificates must chain to
    /// when mutual TLS is on.
    pub fn server(&self) -> Result<ServerTlsConfig, String> {
        let identity = self.identity.clone().ok_or_else(|| {
            format!(
                "{} is set but {}/{} are not: a server needs its own certificate (`rlhf certs`)",
                env::TLS_CA,
                env::TLS_CERT,
                env::TLS_KEY
            )
        })?;
        let config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(std::time::Duration::from_secs(10));
        Ok(if self.client_auth {
            config.client_ca_root(self.ca.clone())
        } else {
            config
        })
    }

    /// A client's TLS: servers verified against the CA; this process's certificate presented
    /// when it has one (mutual TLS).
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .timeout(std::time::Duration::from_secs(10));
        match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        }
    }
}

impl Security {
    /// The configuration the environment describes (docs/security.md). A service process
    /// (actor, learner, reward server) accepts the one token it holds.
    pub fn from_env() -> Result<Security, String> {
        let ca = path_var(env::TLS_CA);
        let cert = path_var(env::TLS_CERT);
        let key = path_var(env::TLS_KEY);
        let client_auth = flag(env::TLS_CLIENT_AUTH)?;
        let cert_key = match (&cert, &key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(format!(
                    "{} and {} go together: set both or neither",
                    env::TLS_CERT,
                    env::TLS_KEY
                ));
            }
        };
        let tls = match ca {
            Some(ca) => Some(Tls::load(&ca, cert_key, client_auth)?),
            None if cert_key.is_some() || client_auth => {
                return Err(format!(
                    "{} is not set: without the CA no peer can be verified",
                    env::TLS_CA
                ));
            }
            None => None,
        };
        let token = match (
            std::env::var(env::TOKEN).ok().filter(|t| !t.is_empty()),
            path_var(env::TOKEN_FILE),
        ) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{} and {} are both set: give the token one way",
                    env::TOKEN,
                    env::TOKEN_FILE
                ));
            }
            (Some(t), None) => Some(t.trim().to_string()),
            (None, Some(file)) => {
                let text = read(&file, env::TOKEN_FILE)?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            (None, None) => None,
        };
        if let Some(t) = &token
            && let Some(problem) = tokens::token_problem(t)
        {
            return Err(format!(
                "the token ({}/{}) {problem}",
                env::TOKEN,
                env::TOKEN_FILE
            ));
        }
        Ok(Security {
            accepts: token.as_deref().map(|t| TokenTable::single(t, Role::Join)),
            tls,
            token,
            insecure: flag(env::INSECURE)?,
        })
    }

    /// A coordinator: accepts `table`, and presents the cluster's `join` token to the services
    /// it drives unless the environment gave it a token of its own.
    pub fn with_table(mut self, table: TokenTable) -> Security {
        if self.token.is_none() {
            self.token = table.join_token().map(str::to_string);
        }
        self.accepts = Some(table);
        self
    }

    /// Whether clients of this process speak TLS.
    pub fn tls_on(&self) -> bool {
        self.tls.is_some()
    }

    /// Refuses to serve `addr` beyond loopback without TLS and tokens unless `insecure`.
    pub fn check_listen(&self, addr: SocketAddr) -> Result<(), String> {
        if addr.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        let mut missing = Vec::new();
        if self.tls.is_none() {
            missing.push(format!(
                "TLS ({}, {}, {})",
                env::TLS_CA,
                env::TLS_CERT,
                env::TLS_KEY
            ));
        }
        if self.accepts.is_none() {
            missing.push(
                "tokens (the coordinator's --tokens FILE; a worker's RLHF_TOKEN_FILE)".into(),
            );
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {addr} (beyond loopback) without {}: anyone on the network could use it. \
             Configure them (docs/security.md: `rlhf certs`, `rlhf tokens`), listen on 127.0.0.1, \
             or start with --insecure ({}=1)",
            missing.join(" and "),
            env::INSECURE
        ))
    }

    /// Logs what a server started with `insecure` exposes (at every start).
    pub fn warn_if_insecure(&self, addr: SocketAddr) {
        if self.insecure
            && !addr.ip().is_loopback()
            && (self.tls.is_none() || self.accepts.is_none())
        {
            tracing::warn!(
                %addr,
                tls = self.tls.is_some(),
                tokens = self.accepts.is_some(),
                "--insecure: serving beyond loopback without TLS and tokens; anyone who reaches this address can use it"
            );
        }
    }

    /// The certificate file this process serves, for messages.
    pub fn cert_file(&self) -> Option<&Path> {
        self.tls.as_ref().and_then(|t| t.cert_file.as_deref())
    }
}

static CURRENT: OnceLock<Security> = OnceLock::new();

/// Sets this process's configuration; first call wins (returns false if one was set already).
pub fn install(security: Security) -> bool {
    CURRENT.set(security).is_ok()
}

/// This process's configuration: the installed one, else the environment's. A broken
/// environment (a missing certificate file, say) ends the process with the reason: every
/// binary calls [`init`] first, so this happens only where a library is used without it.
pub fn current() -> &'static Security {
    CURRENT.get_or_init(|| {
        Security::from_env().unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        })
    })
}

/// Reads the environment's configuration at a binary's start, so that a problem is reported
/// as an error before anything runs.
pub fn init() -> Result<&'static Security, String> {
    if let Some(s) = CURRENT.get() {
        return Ok(s);
    }
    let s = Security::from_env()?;
    let _ = CURRENT.set(s);
    Ok(current())
}
