//! `rlhf certs` and `rlhf tokens`: a cluster's CA, certificates signed by it, and random tokens,
//! written with owner-only permissions where they are secret.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The CA's subject. Certificates are signed in its name, so a CA made by an earlier run is
/// used again from its key and this name alone.
const CA_NAME: &str = "rlhf cluster CA";
/// Validity of what `rlhf certs` makes (CA and certificates alike).
const VALID: Duration = Duration::days(3650);

/// What one `rlhf certs` run wrote.
#[derive(Debug)]
pub struct Issued {
    /// Whether this run made the CA (it existed otherwise).
    pub new_ca: bool,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Writes `text` to `path`; `secret` files are readable by their owner only.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(|e| io(path, e))?;
    // `mode` applies only to a file this call creates: one that existed keeps its own.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(path, e))?;
    }
    f.write_all(text.as_bytes()).map_err(|e| io(path, e))
}

fn with_validity(mut params: CertificateParams) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    // A day back: clocks across a cluster are not exactly in step.
    params.not_before = now - Duration::days(1);
    params.not_after = now + VALID;
    params
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    with_validity(params)
}

/// The CA in `dir` (`ca.pem`, `ca.key`), made first when there is none.
fn ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, bool), String> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (cert.is_file(), key.is_file()) {
        (true, true) => {
            let pem = std::fs::read_to_string(&key).map_err(|e| io(&key, e))?;
            let key_pair = KeyPair::from_pem(&pem).map_err(|e| io(&key, e))?;
            Ok((Issuer::new(ca_params(), key_pair), false))
        }
        (false, false) => {
            let key_pair = KeyPair::generate().map_err(|e| e.to_string())?;
            let params = ca_params();
            let made = params.self_signed(&key_pair).map_err(|e| e.to_string())?;
            write(&key, &key_pair.serialize_pem(), true)?;
            write(&cert, &made.pem(), false)?;
            Ok((Issuer::new(params, key_pair), true))
        }
        _ => Err(format!(
            "{}: has one of ca.pem and ca.key but not the other; remove it or add the missing one",
            dir.display()
        )),
    }
}

/// A subject alternative name: an IP address or a DNS name.
fn san(name: &str) -> Result<SanType, String> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(format!("--san {name:?}: not an IP address or a DNS name"));
    }
    let dns = name
        .to_string()
        .try_into()
        .map_err(|e| format!("--san {name:?}: {e}"))?;
    Ok(SanType::DnsName(dns))
}

/// Makes (once) a CA in `dir` and a certificate `NAME.pem` / `NAME.key` signed by it, for
/// server and client use, valid for `localhost`, `127.0.0.1`, `::1` and every name in `sans`.
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<Issued, String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || name.starts_with('.')
        || name == "ca"
    {
        return Err(format!(
            "--name {name:?}: letters, digits, `-`, `_` and `.` only (and not `ca`)"
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut names: Vec<SanType> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| san(s))
        .collect::<Result<_, _>>()?;
    for s in sans {
        let s = san(s)?;
        if !names.contains(&s) {
            names.push(s);
        }
    }
    let (issuer, new_ca) = ca(dir)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = names;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let params = with_validity(params);
    let key_pair = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params
        .signed_by(&key_pair, &issuer)
        .map_err(|e| e.to_string())?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write(&key_path, &key_pair.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(Issued {
        new_ca,
        ca: dir.join("ca.pem"),
        cert: cert_path,
        key: key_path,
    })
}

/// A random token: 32 bytes from the thread's CSPRNG (ChaCha, seeded by the OS), hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Writes `dir/tokens` (a coordinator's table: one `read`, one `submit`, one `join` token) and
/// `dir/ROLE.token` for each, all owner-only. Refuses to overwrite an existing table.
pub fn write_tokens(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let table = dir.join("tokens");
    if table.exists() {
        return Err(format!(
            "{}: exists; remove it first to make new tokens (workers holding the old join token would be refused)",
            table.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut text = String::from("# role   token (docs/security.md)\n");
    let mut written = Vec::new();
    for role in ["read", "submit", "join"] {
        let token = new_token();
        text += &format!("{role:<8} {token}\n");
        let file = dir.join(format!("{role}.token"));
        write(&file, &format!("{token}\n"), true)?;
        written.push(file);
    }
    write(&table, &text, true)?;
    written.insert(0, table);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_certificate_is_signed_by_the_first_run_s_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = issue(
            dir.path(),
            "coordinator",
            &["10.1.0.2".into(), "node-1".into()],
        )
        .unwrap();
        assert!(first.new_ca);
        let ca_before = std::fs::read_to_string(&first.ca).unwrap();
        let second = issue(dir.path(), "worker", &[]).unwrap();
        assert!(!second.new_ca);
        assert_eq!(std::fs::read_to_string(&second.ca).unwrap(), ca_before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&second.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            issue(dir.path(), "../x", &[])
                .unwrap_err()
                .contains("--name")
        );
        assert!(issue(dir.path(), "ca", &[]).unwrap_err().contains("--name"));
        let err = issue(dir.path(), "w", &["a b".into()]).unwrap_err();
        assert!(err.contains("--san \"a b\""), "{err}");
    }

    #[test]
    fn tokens_are_written_once_each_role_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_tokens(dir.path()).unwrap();
        assert_eq!(files.len(), 4);
        let table = std::fs::read_to_string(&files[0]).unwrap();
        let parsed = super::super::tokens::TokenTable::parse(&table, "tokens").unwrap();
        let join = std::fs::read_to_string(dir.path().join("join.token")).unwrap();
        assert_eq!(parsed.join_token(), Some(join.trim()));
        assert!(write_tokens(dir.path()).unwrap_err().contains("exists"));
    }
}
