//! The security flags every `rlhf` command takes (exported to the processes it starts), and
//! `rlhf certs` / `rlhf tokens` (docs/security.md).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use rlhf_proto::security::{certs, env};

/// TLS and token settings; each flag is also its environment variable.
#[derive(Debug, Args)]
pub struct SecurityArgs {
    /// PEM file of the CA that signed the cluster's certificates; turns TLS on.
    #[arg(long, global = true, env = env::TLS_CA, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM file of this process's certificate (servers present it; clients when asked).
    #[arg(long, global = true, env = env::TLS_CERT, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM file of this process's private key.
    #[arg(long, global = true, env = env::TLS_KEY, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Servers require client certificates signed by the CA (mutual TLS).
    #[arg(long, global = true)]
    tls_client_auth: bool,
    /// A file whose first line is the bearer token this process presents (`RLHF_TOKEN` gives
    /// the token itself).
    #[arg(long, global = true, env = env::TOKEN_FILE, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Allow listening beyond loopback without TLS and tokens (logs a warning at every start).
    #[arg(long, global = true)]
    insecure: bool,
}

impl SecurityArgs {
    /// Sets the environment variables of the flags given (the environment's own values stay).
    ///
    /// # Safety
    /// Call before the process starts any thread (it changes the environment).
    pub unsafe fn export(&self) {
        let paths = [
            (env::TLS_CA, &self.tls_ca),
            (env::TLS_CERT, &self.tls_cert),
            (env::TLS_KEY, &self.tls_key),
            (env::TOKEN_FILE, &self.token_file),
        ];
        for (name, value) in paths {
            if let Some(v) = value {
                // SAFETY: the caller guarantees no other thread runs.
                unsafe { std::env::set_var(name, v) };
            }
        }
        for (name, on) in [
            (env::TLS_CLIENT_AUTH, self.tls_client_auth),
            (env::INSECURE, self.insecure),
        ] {
            if on {
                // SAFETY: as above.
                unsafe { std::env::set_var(name, "1") };
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// The folder of the CA and the certificates (made if missing).
    #[arg(long)]
    out: PathBuf,
    /// The certificate's name: writes `NAME.pem` and `NAME.key`.
    #[arg(long, default_value = "node")]
    name: String,
    /// A host name or IP address the certificate is valid for (repeatable; `localhost` and
    /// 127.0.0.1 always are).
    #[arg(long = "san", value_name = "HOST_OR_IP")]
    sans: Vec<String>,
}

pub fn certs(args: CertsArgs) -> Result<()> {
    let issued = certs::issue(&args.out, &args.name, &args.sans).map_err(anyhow::Error::msg)?;
    if issued.new_ca {
        eprintln!(
            "made a CA: {} (its key, ca.key, signs further certificates: keep it off the cluster's machines)",
            issued.ca.display()
        );
    }
    eprintln!(
        "certificate {} and key {} (signed by {})",
        issued.cert.display(),
        issued.key.display(),
        issued.ca.display()
    );
    println!(
        "{}={} {}={} {}={}",
        env::TLS_CA,
        issued.ca.display(),
        env::TLS_CERT,
        issued.cert.display(),
        env::TLS_KEY,
        issued.key.display()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct TokensArgs {
    /// The folder to write `tokens` (the coordinator's `--tokens`) and `read.token`,
    /// `submit.token`, `join.token` (for `RLHF_TOKEN_FILE`) into.
    #[arg(long)]
    out: PathBuf,
}

pub fn tokens(args: TokensArgs) -> Result<()> {
    let files = certs::write_tokens(&args.out).map_err(anyhow::Error::msg)?;
    for f in &files {
        println!("{}", f.display());
    }
    eprintln!(
        "give the coordinator --tokens {}; workers RLHF_TOKEN_FILE=join.token; users read.token or submit.token",
        files[0].display()
    );
    Ok(())
}
